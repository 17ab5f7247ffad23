"""`serving` answers HTTP before the engine is open: liveness at once, readiness (and the run
API) only once open() has recovered the runs it found, over a real loopback server."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
from rulebound.adapters.http.server import address, listen, serving
from rulebound.domain import FAIL, Step, Workflow
from rulebound.engine import Engine, ExecutorContext, Task

FLOW = Workflow("work", on_failure=FAIL, steps=[Step("do", executor="work")])


class Gated:
    """An executor whose `open` (awaited by Engine.open) waits for the test's word."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.opening = asyncio.Event()

    async def open(self, context: ExecutorContext) -> None:
        self.opening.set()
        await self.gate.wait()

    async def __call__(self, task: Task) -> Any:
        return {"done": task.input}


async def _stuck(task: Task) -> Any:
    await asyncio.sleep(3600)


async def _call(session: aiohttp.ClientSession, method: str, url: str,
                **kw: Any) -> tuple[int, Any, Any]:
    async with session.request(method, url, **kw) as resp:
        return resp.status, await resp.json(content_type=None), resp.headers


async def test_live_at_once_ready_only_after_open_has_recovered_runs(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path / 'runs.db'}"
    async with Engine(store, [FLOW], {"work": _stuck}, drain_timeout=0.05) as first:
        left = await first.start("work", {"n": 1})  # cut off in flight: the next start's work
    executor = Gated()
    engine = Engine(store, [FLOW], {"work": executor})
    sock = listen("127.0.0.1", 0)
    base = address(sock)
    try:
        async with serving(engine, sock, token=None), aiohttp.ClientSession() as session:
            status, body, _ = await _call(session, "GET", f"{base}/readyz")
            assert (status, body) == (503, {"ready": False, "reason": "starting"})
            opening = asyncio.create_task(engine.open())
            await asyncio.wait_for(executor.opening.wait(), 10)

            status, health, _ = await _call(session, "GET", f"{base}/healthz")
            assert status == 200 and health["status"] == "ok"
            status, body, headers = await _call(session, "GET", f"{base}/readyz")
            assert status == 503
            assert body == {"ready": False,
                            "reason": "opening the store and recovering runs"}
            assert int(headers["Retry-After"]) >= 1
            for method, path, kw in (("POST", "/v1/runs", {"json": {"workflow": "work"}}),
                                     ("GET", "/v1/runs", {}),
                                     ("GET", f"/v1/runs/{left}", {}),
                                     ("GET", "/v1/workflows", {})):
                status, body, headers = await asyncio.wait_for(
                    _call(session, method, base + path, **kw), 10)  # answered, never a hang
                assert status == 503, (path, body)
                assert body["error"]["type"] == "not_ready", body
                assert "recovering runs" in body["error"]["message"]
                assert int(headers["Retry-After"]) >= 1
            async with session.get(f"{base}/metrics") as resp:
                assert resp.status == 200
                assert "rulebound_ready 0" in await resp.text()
            assert not opening.done()

            executor.gate.set()
            await asyncio.wait_for(opening, 30)
            status, body, headers = await _call(session, "GET", f"{base}/readyz")
            assert (status, body) == (200, {"ready": True, "reason": None})
            assert "Retry-After" not in headers
            async with session.get(f"{base}/metrics") as resp:
                assert "rulebound_ready 1" in await resp.text()
            # the run cut off before is taken up again: recovery happened before "ready"
            for _ in range(500):
                status, run, _ = await _call(session, "GET", f"{base}/v1/runs/{left}")
                if run["status"] == "completed":
                    break
                await asyncio.sleep(0.02)
            assert (status, run["status"], run["output"]) == (200, "completed", {"done": {"n": 1}})
            status, started, _ = await _call(session, "POST", f"{base}/v1/runs",
                                             json={"workflow": "work", "input": 2})
            assert status == 201, started
    finally:
        await engine.close()
        sock.close()


async def test_readyz_is_in_the_openapi_document_without_auth(tmp_path: Path) -> None:
    engine = Engine(f"sqlite:///{tmp_path / 'runs.db'}", [FLOW], {"work": Gated()})
    sock = listen("127.0.0.1", 0)
    try:
        async with serving(engine, sock, token="s3cret-token"), \
                aiohttp.ClientSession() as session:
            status, doc, _ = await _call(session, "GET", f"{address(sock)}/openapi.json")
            assert status == 200
            ready = doc["paths"]["/readyz"]["get"]
            assert ready["security"] == [] and {"200", "503"} <= set(ready["responses"])
            # no token needed for the probes; the run API still wants one (and says so
            # before saying it is not ready: nothing about the server leaks to a stranger)
            status, body, _ = await _call(session, "GET", f"{address(sock)}/readyz")
            assert (status, body["ready"]) == (503, False)
            status, body, _ = await _call(session, "GET", f"{address(sock)}/v1/runs")
            assert (status, body["error"]["type"]) == (401, "unauthorized")
    finally:
        sock.close()
