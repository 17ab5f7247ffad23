"""A canary API key through every success and error path: it must appear nowhere we write."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from adapters.cli import main
from adapters.executors import AnthropicMessages, HttpTool, OpenAIChat
from adapters.http.server import create_app
from domain import FAIL, Retry, Step, Workflow
from engine import Engine

from .fake_providers import MODE, make_app
from .test_http_executors import CANARY, Customer, Label


def _database_bytes(db: Path) -> bytes:
    wal = Path(str(db) + "-wal")
    return db.read_bytes() + (wal.read_bytes() if wal.exists() else b"")


MODES = ["ok", "invalid-then-valid", "always-invalid", "429", "401", "403", "500", "503",
         "malformed", "truncated", "oversized", "slow"]


async def test_the_canary_key_never_reaches_events_logs_errors_or_outputs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("CANARY_KEY", CANARY)
    fake = make_app()
    runner = web.AppRunner(fake)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    base = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    once = Retry(attempts=1)
    wf = Workflow("canary", on_failure=FAIL, steps=[
        Step("openai", executor="openai", output=Label, timeout=1, retry=once,
             config={"prompt": "classify {text}"}, next="anthropic", on_failure="anthropic"),
        Step("anthropic", executor="anthropic", output=Label, timeout=1, retry=once,
             config={"prompt": "classify {text}"}, next="tool", on_failure="tool"),
        Step("tool", executor="tool", timeout=1, retry=once, input={"customer_id": "input.c"})])
    executors = {
        "openai": OpenAIChat("gpt-4o-mini", base_url=f"{base}/v1", api_key_env="CANARY_KEY"),
        "anthropic": AnthropicMessages("claude", base_url=base, api_key_env="CANARY_KEY"),
        "tool": HttpTool("GET", f"{base}/customers/{{customer_id}}", response=Customer,
                         headers={"Authorization": "Bearer ${CANARY_KEY}"},
                         allow=["127.0.0.1"], max_bytes=1024 * 1024),
    }
    db = tmp_path / "canary.db"
    store = f"sqlite:///{db}"
    outputs: list[str] = []
    async with Engine(store, [wf], executors) as engine:
        runs = []
        for mode in MODES:
            fake[MODE].clear()
            fake[MODE]["mode"] = mode
            run_id = await engine.start("canary", {"text": "refund", "c": "c1"})
            view = await engine.wait(run_id, timeout=30)
            runs.append(str(run_id))
            outputs.append(str(view.to_dict()))
        assert any('"kind"' not in o for o in outputs)
        headers_seen = [r["headers"].get("Authorization", "") + r["headers"].get("x-api-key", "")
                        for r in fake[MODE].get("requests", [])]
        assert any(CANARY in h for h in headers_seen)  # the key really was used
        app_runner = web.AppRunner(create_app(engine))
        await app_runner.setup()
        api = web.TCPSite(app_runner, "127.0.0.1", 0)
        await api.start()
        api_base = f"http://127.0.0.1:{api._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
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
    kinds = {e for o in outputs for e in ("rate_limited", "auth", "server_error",
                                          "invalid_output", "truncated", "too_large", "timeout",
                                          "bad_response") if e in o}
    assert kinds >= {"rate_limited", "auth", "server_error", "invalid_output", "bad_response",
                     "truncated", "timeout"}


def test_executors_do_not_show_keys_in_their_repr() -> None:
    model = OpenAIChat("m", api_key=lambda: CANARY)
    assert CANARY not in repr(model)
    assert CANARY not in str(vars(model).get("_api_key_env"))


