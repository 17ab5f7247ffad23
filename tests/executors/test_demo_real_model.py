"""`rulebound demo` against an OpenAI-compatible endpoint configured by environment."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import loopback

from .fake_providers import MODE, make_app

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def endpoint() -> Iterator[tuple[str, dict]]:
    import asyncio

    loop = asyncio.new_event_loop()
    app = make_app()
    app[MODE]["mode"] = "schema"
    started = threading.Event()
    holder: dict[str, object] = {}

    def serve() -> None:
        asyncio.set_event_loop(loop)
        runner = loop.run_until_complete(loopback.serve(app))
        holder["port"] = loopback.port(runner)
        holder["runner"] = runner
        started.set()
        loop.run_forever()
        loop.run_until_complete(runner.cleanup())

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert started.wait(10)
    yield f"http://127.0.0.1:{holder['port']}/v1", app[MODE]
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def test_the_demo_runs_against_a_configured_model(tmp_path: Path,
                                                  endpoint: tuple[str, dict]) -> None:
    base, state = endpoint
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RULEBOUND_OPENAI_BASE_URL": base,
           "RULEBOUND_OPENAI_MODEL": "local-model", "RULEBOUND_OPENAI_API_KEY": "sk-local",
           "RULEBOUND_OPENAI_PRICE": "0"}
    done = subprocess.run([sys.executable, "-m", "rulebound.adapters.cli", "demo", "--no-explain",
                           "--store", f"sqlite:///{tmp_path / 'real.db'}"],
                          capture_output=True, text=True, timeout=180, env=env)
    assert done.returncode == 0, done.stderr
    assert "model local-model at " + base in done.stdout
    assert "sk-local" not in done.stdout + done.stderr
    bodies = [r["body"] for r in state["requests"]]
    assert {b["model"] for b in bodies} == {"local-model"}
    assert any("Classify this support ticket" in b["messages"][-1]["content"] for b in bodies)
    assert all(r["headers"]["Authorization"] == "Bearer sk-local" for r in state["requests"])
    assert "runs         37" in done.stdout


def test_a_model_without_a_price_is_one_clear_error(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RULEBOUND_OPENAI_BASE_URL":
           "http://127.0.0.1:9/v1", "RULEBOUND_OPENAI_MODEL": "local-model"}
    env.pop("RULEBOUND_OPENAI_PRICE", None)
    done = subprocess.run([sys.executable, "-m", "rulebound.adapters.cli", "demo", "--no-explain",
                           "--store", f"sqlite:///{tmp_path / 'real.db'}"],
                          capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode != 0
    assert "no price for model 'local-model'" in done.stderr
    assert "Traceback" not in done.stderr
