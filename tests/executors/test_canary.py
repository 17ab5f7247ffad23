"""A canary API key through every success and error path: it must appear nowhere we write."""

from __future__ import annotations

import asyncio
import logging
import socket
from pathlib import Path

import aiohttp
import pytest
from rulebound.adapters.cli import main
from rulebound.adapters.executors import AnthropicMessages, HttpTool, OpenAIChat
from rulebound.adapters.http.server import create_app
from rulebound.domain import FAIL, Retry, Step, Workflow
from rulebound.engine import Engine

from tests import loopback

from .fake_providers import MODE, make_app
from .test_http_executors import CANARY, Customer, Label


def _database_bytes(db: Path) -> bytes:
    wal = Path(str(db) + "-wal")
    return db.read_bytes() + (wal.read_bytes() if wal.exists() else b"")


PRIVATE = "http://169.254.169.254/latest/meta-data/iam"
MODES = ["ok", "invalid-then-valid", "always-invalid", "429", "400", "401", "403", "404",
         "422", "500", "503", "malformed", "truncated", "oversized", "slow",
         f"redirect:{PRIVATE}"]


def _closed_port() -> int:
    """A loopback port nothing listens on: connecting to it is refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _executors(base: str) -> dict[str, object]:
    return {
        "openai": OpenAIChat("gpt-4o-mini", base_url=f"{base}/v1", api_key_env="CANARY_KEY"),
        "anthropic": AnthropicMessages("claude-haiku-4-5", base_url=base,
                                       api_key_env="CANARY_KEY"),
        "tool": HttpTool("GET", f"{base}/customers/{{customer_id}}", response=Customer,
                         headers={"Authorization": "Bearer ${CANARY_KEY}"},
                         allow=["127.0.0.1"], max_bytes=1024 * 1024),
        "follow": HttpTool("GET", f"{base}/customers/{{customer_id}}", response=Customer,
                           headers={"Authorization": "Bearer ${CANARY_KEY}"},
                           allow=["127.0.0.1"], follow_redirects=True),
    }


def _workflow(name: str, prefix: str = "") -> Workflow:
    once = Retry(attempts=1)
    return Workflow(name, on_failure=FAIL, steps=[
        Step("openai", executor=f"{prefix}openai", output=Label, timeout=1, retry=once,
             max_tokens=1000, config={"prompt": "classify {text}"}, next="anthropic",
             on_failure="anthropic"),
        Step("anthropic", executor=f"{prefix}anthropic", output=Label, timeout=1, retry=once,
             max_tokens=1000, config={"prompt": "classify {text}"}, next="tool",
             on_failure="tool"),
        Step("tool", executor=f"{prefix}tool", timeout=1, retry=once,
             input={"customer_id": "input.c"}, next="follow", on_failure="follow"),
        Step("follow", executor=f"{prefix}follow", timeout=1, retry=once,
             input={"customer_id": "input.c"})])


async def test_the_canary_key_never_reaches_events_logs_errors_or_outputs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("CANARY_KEY", CANARY)
    fake = make_app()
    runner = await loopback.serve(fake)
    base = loopback.base_url(runner)
    down = f"http://127.0.0.1:{_closed_port()}"
    executors = {**_executors(base),
                 **{f"down_{k}": v for k, v in _executors(down).items()}}
    workflows = [_workflow("canary"), _workflow("canary-down", "down_")]
    db = tmp_path / "canary.db"
    store = f"sqlite:///{db}"
    outputs: list[str] = []
    async with Engine(store, workflows, executors) as engine:
        runs: list[str] = []
        headers_seen: list[str] = []
        for workflow, mode in [*(("canary", m) for m in MODES), ("canary-down", "ok")]:
            fake[MODE].clear()
            fake[MODE]["mode"] = mode
            run_id = await engine.start(workflow, {"text": "refund", "c": "c1"})
            view = await engine.wait(run_id, timeout=30)
            runs.append(str(run_id))
            outputs.append(str(view.to_dict()))
            headers_seen += [r["headers"].get("Authorization", "")
                             + r["headers"].get("x-api-key", "")
                             for r in fake[MODE].get("requests", [])]
        assert any('"kind"' not in o for o in outputs)
        assert any(CANARY in h for h in headers_seen)  # the key really was used
        app_runner = await loopback.serve(create_app(engine))
        api_base = loopback.base_url(app_runner)
        async with aiohttp.ClientSession() as session:
            for path in ["/metrics", "/v1/runs", *(f"/v1/runs/{r}" for r in runs),
                         *(f"/v1/runs/{r}/events" for r in runs),
                         *(f"/v1/runs/{r}/explain" for r in runs)]:
                async with session.get(api_base + path) as resp:
                    outputs.append(await resp.text())
        await app_runner.cleanup()
        stored = await asyncio.to_thread(_database_bytes, db)  # the file and its WAL
    await runner.cleanup()
    for run in runs:
        for args in (["explain", run], ["show", run], ["export", run]):
            assert await asyncio.to_thread(main, [*args, "--store", store]) == 0
    printed = capsys.readouterr()
    outputs += [printed.out, printed.err]
    stored += await asyncio.to_thread(_database_bytes, db)
    statuses = [o for o in outputs if "error_type" in o]
    assert statuses  # the error paths ran and were recorded
    assert CANARY.encode() not in stored
    assert CANARY not in caplog.text
    for text in outputs:
        assert CANARY not in text
    every = {"rate_limited", "auth", "server_error", "invalid_output", "bad_response",
             "truncated", "too_large", "timeout", "client_error", "not_found", "connection",
             "refused"}
    kinds = {e for o in outputs for e in every if f"'{e}'" in o or f'"{e}"' in o}
    assert kinds == every
    assert any("redirects are off" in o for o in outputs)  # the tool that does not follow
    assert any("169.254.169.254" in o and "refused" in o for o in outputs)  # the one that does


def test_executors_do_not_show_keys_in_their_repr() -> None:
    model = OpenAIChat("m", api_key=lambda: CANARY, price=0)
    assert CANARY not in repr(model) and CANARY not in str(model)
    assert CANARY not in str(vars(model))  # held only behind its provider, in no attribute
    assert model.secret_values() == [CANARY]  # which still gives it to the engine to scrub




def test_every_shipped_executor_declares_its_secret_for_the_engine_to_scrub(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The engine scrubs what executors declare from every failure message it stores: a
    # shipped executor that held a key without declaring it would escape that net.
    monkeypatch.setenv("RB_CANARY_KEY", CANARY)
    assert OpenAIChat("m", price=(0, 0), api_key_env="RB_CANARY_KEY").secret_values() == [
        CANARY]
    assert AnthropicMessages("m", price=(0, 0), api_key_env="RB_CANARY_KEY"
                             ).secret_values() == [CANARY]
    tool = HttpTool("POST", "https://api.example.com/x",
                    headers={"Authorization": "Bearer ${RB_CANARY_KEY}"})
    assert tool.secret_values() == [CANARY]
