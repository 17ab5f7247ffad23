"""The HTTP API over a real loopback server: routes, auth, errors, SSE, backpressure."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from pydantic import BaseModel

from adapters.http.server import create_app, serve
from domain import FAIL, Step, WaitForSignal, Workflow
from domain.errors import RuleboundError
from engine import Engine, Task


class Order(BaseModel):
    item: str
    qty: int


async def echo(task: Task) -> Any:
    return {"got": task.input}


def workflows() -> list[Workflow]:
    return [
        Workflow("order", input_schema=Order, on_failure=FAIL,
                 steps=[Step("place", executor="echo")]),
        Workflow("approval", on_failure=FAIL, steps=[
            WaitForSignal("wait", signal="go", timeout=60, next="done"),
            Step("done", executor="echo")]),
    ]


class Client:
    def __init__(self, session: aiohttp.ClientSession, base: str, engine: Engine) -> None:
        self.session, self.base, self.engine = session, base, engine

    async def call(self, method: str, path: str, **kw: Any) -> tuple[int, Any, Any]:
        async with self.session.request(method, self.base + path, **kw) as resp:
            text = await resp.text()
            assert "Traceback" not in text
            body: Any = text
            if resp.content_type == "application/json":
                body = await resp.json()
            return resp.status, body, resp.headers


async def _server(engine: Engine, token: str | None = None) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(create_app(engine, token=token))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}"


@pytest.fixture
async def client(sqlite_url: str) -> AsyncIterator[Client]:
    async with Engine(sqlite_url, workflows(), {"echo": echo}) as engine:
        runner, base = await _server(engine)
        async with aiohttp.ClientSession() as session:
            yield Client(session, base, engine)
        await runner.cleanup()


async def test_start_get_and_list_runs(client: Client) -> None:
    status, body, headers = await client.call(
        "POST", "/v1/runs", json={"workflow": "order", "input": {"item": "pen", "qty": 2}})
    assert status == 201
    run_id = body["run_id"]
    assert headers["Location"] == f"/v1/runs/{run_id}"
    await client.engine.wait(run_id, timeout=5)
    status, run, _ = await client.call("GET", f"/v1/runs/{run_id}")
    assert status == 200
    assert run["status"] == "completed"
    assert run["output"] == {"got": {"item": "pen", "qty": 2}}
    status, listing, _ = await client.call("GET", "/v1/runs?status=completed&limit=10")
    assert status == 200
    assert [r["run_id"] for r in listing["runs"]] == [run_id]
    status, events, _ = await client.call("GET", f"/v1/runs/{run_id}/events")
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert events[0]["type"] == "RunStarted"
    status, text, _ = await client.call("GET", f"/v1/runs/{run_id}/explain")
    assert status == 200
    assert "run completed" in text


async def test_idempotency_key_header_gives_the_same_run(client: Client) -> None:
    body = {"workflow": "order", "input": {"item": "pen", "qty": 1}}
    first = await client.call("POST", "/v1/runs", json=body, headers={"Idempotency-Key": "a1"})
    second = await client.call("POST", "/v1/runs", json=body, headers={"Idempotency-Key": "a1"})
    assert first[0] == 201
    assert second[0] == 200
    assert first[1]["run_id"] == second[1]["run_id"]


async def test_pagination(client: Client) -> None:
    for i in range(5):
        await client.call("POST", "/v1/runs",
                          json={"workflow": "order", "input": {"item": str(i), "qty": i}})
    _, page1, _ = await client.call("GET", "/v1/runs?limit=2")
    _, page2, _ = await client.call("GET", f"/v1/runs?limit=2&offset={page1['next_offset']}")
    _, page3, _ = await client.call("GET", "/v1/runs?limit=2&offset=4")
    ids = [r["run_id"] for r in page1["runs"] + page2["runs"] + page3["runs"]]
    assert len(ids) == len(set(ids)) == 5
    assert page3["next_offset"] is None


@pytest.mark.parametrize(("method", "path", "kwargs", "status"), [
    ("POST", "/v1/runs", {"data": b"{not json", "headers": {"Content-Type":
                                                             "application/json"}}, 400),
    ("POST", "/v1/runs", {"json": ["a", "list"]}, 400),
    ("POST", "/v1/runs", {"json": {"workflow": 3}}, 400),
    ("POST", "/v1/runs", {"json": {"workflow": "order", "extra": 1}}, 400),
    ("POST", "/v1/runs", {"json": {"workflow": "nope", "input": {}}}, 404),
    ("POST", "/v1/runs", {"json": {"workflow": "order", "input": {"item": "x"}}}, 422),
    ("POST", "/v1/runs", {"json": {"workflow": "order", "input": {"item": 1, "qty": "x"}}},
     422),
    ("POST", "/v1/runs", {"data": b"x" * (1024 * 1024 + 1),
                          "headers": {"Content-Type": "application/json"}}, 413),
    ("POST", "/v1/runs", {"data": b"<xml/>", "headers": {"Content-Type": "text/xml"}}, 415),
    ("GET", "/v1/runs/not-a-uuid", {}, 404),
    ("GET", "/v1/runs/00000000-0000-4000-8000-000000000000", {}, 404),
    ("GET", "/v1/runs/00000000-0000-4000-8000-000000000000/events", {}, 404),
    ("POST", "/v1/runs/00000000-0000-4000-8000-000000000000/signals/go", {"json": {}}, 404),
    ("POST", "/v1/runs/00000000-0000-4000-8000-000000000000/cancel", {}, 404),
    ("GET", "/v1/runs?status=weird", {}, 400),
    ("GET", "/v1/runs?limit=0", {}, 400),
    ("GET", "/v1/runs?limit=abc", {}, 400),
    ("GET", "/v1/workflows/nope", {}, 404),
    ("DELETE", "/v1/runs", {}, 405),
    ("GET", "/v1/nothing-here", {}, 404),
])
async def test_bad_requests_get_a_json_4xx_and_append_nothing(
    client: Client, method: str, path: str, kwargs: dict[str, Any], status: int,
) -> None:
    before = client.engine.storage.store.last_position()
    got, body, _ = await client.call(method, path, **kwargs)
    assert got == status, body
    assert set(body["error"]) == {"type", "message"}
    assert body["error"]["message"]
    assert client.engine.storage.store.last_position() == before


async def test_signals_cancel_and_conflicts(client: Client) -> None:
    _, started, _ = await client.call("POST", "/v1/runs", json={"workflow": "approval"})
    run_id = started["run_id"]
    status, _, _ = await client.call("POST", f"/v1/runs/{run_id}/signals/go",
                                     json={"ok": True})
    assert status == 202
    await client.engine.wait(run_id, timeout=5)
    before = client.engine.storage.store.last_position()
    status, body, _ = await client.call("POST", f"/v1/runs/{run_id}/signals/go", json={})
    assert status == 409
    assert body["error"]["type"] == "run_ended"
    status, _, _ = await client.call("POST", f"/v1/runs/{run_id}/cancel")
    assert status == 409
    assert client.engine.storage.store.last_position() == before

    _, started, _ = await client.call("POST", "/v1/runs", json={"workflow": "approval"})
    status, _, _ = await client.call("POST", f"/v1/runs/{started['run_id']}/cancel",
                                     json={"reason": "no longer needed"})
    assert status == 202
    view = await client.engine.wait(started["run_id"], timeout=5)
    assert view.status == "cancelled"
    assert view.reason == "no longer needed"


async def test_server_sent_events_follow_and_resume(client: Client) -> None:
    _, started, _ = await client.call("POST", "/v1/runs", json={"workflow": "approval"})
    run_id = started["run_id"]
    seen: list[tuple[int, str]] = []

    async def follow(last: int | None) -> None:
        headers = {"Last-Event-ID": str(last)} if last is not None else {}
        async with client.session.get(f"{client.base}/v1/runs/{run_id}/events?follow=1",
                                      headers=headers) as resp:
            assert resp.status == 200
            assert resp.content_type == "text/event-stream"
            seq = None
            async for raw in resp.content:
                line = raw.decode().rstrip("\n")
                if line.startswith("id: "):
                    seq = int(line[4:])
                elif line.startswith("event: "):
                    seen.append((seq, line[7:]))  # type: ignore[arg-type]

    reader = asyncio.create_task(follow(None))
    await asyncio.sleep(0.1)
    await client.call("POST", f"/v1/runs/{run_id}/signals/go", json={})
    await asyncio.wait_for(reader, 5)
    events = await client.engine.events(run_id)
    assert seen == [(i, e.type) for i, e in enumerate(events, start=1)]
    resumed_from = 3
    seen.clear()
    await asyncio.wait_for(follow(resumed_from), 5)
    assert seen == [(i, e.type) for i, e in enumerate(events, start=1) if i > resumed_from]


async def test_workflows_health_metrics_and_openapi(client: Client) -> None:
    _, body, _ = await client.call("GET", "/v1/workflows")
    assert {w["name"] for w in body["workflows"]} == {"order", "approval"}
    _, graph, _ = await client.call("GET", "/v1/workflows/approval")
    assert {n["id"] for n in graph["nodes"]} == {"wait", "done"}
    assert graph["mermaid"].startswith("flowchart")
    status, health, _ = await client.call("GET", "/healthz")
    assert status == 200
    assert health["status"] == "ok"
    await client.call("POST", "/v1/runs", json={"workflow": "order",
                                                "input": {"item": "a", "qty": 1}})
    await asyncio.sleep(0.05)
    status, text, _ = await client.call("GET", "/metrics")
    assert 'rulebound_runs{status="completed"}' in text
    assert "rulebound_attempt_latency_seconds_bucket" in text
    assert "rulebound_event_loop_lag_seconds_count" in text
    _, doc, _ = await client.call("GET", "/openapi.json")
    assert doc["openapi"].startswith("3.")
    routes = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    app_routes = {(r.method, r.resource.canonical) for r in create_app(client.engine).router
                  .routes() if r.method != "HEAD"}
    assert app_routes == routes


async def test_bearer_token_guards_every_v1_route(sqlite_url: str) -> None:
    async with Engine(sqlite_url, workflows(), {"echo": echo}) as engine:
        runner, base = await _server(engine, token="s3cret-token")
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{base}/v1/runs") as resp:
                assert resp.status == 401
                assert "s3cret" not in await resp.text()
            async with session.get(f"{base}/v1/runs",
                                   headers={"Authorization": "Bearer wrong"}) as resp:
                assert resp.status == 401
            async with session.get(f"{base}/v1/runs",
                                   headers={"Authorization": "Bearer s3cret-token"}) as resp:
                assert resp.status == 200
            async with session.get(f"{base}/healthz") as resp:
                assert resp.status == 200
        await runner.cleanup()


async def test_refuses_a_public_address_without_a_token(sqlite_url: str) -> None:
    async with Engine(sqlite_url, workflows(), {"echo": echo}) as engine:
        with pytest.raises(RuleboundError, match="without a token"):
            await serve(engine, "0.0.0.0", 0, token=None)


async def test_backpressure_answers_503_with_retry_after(sqlite_url: str) -> None:
    blocked = asyncio.Event()

    async def stuck(task: Task) -> Any:
        await blocked.wait()
        return {}

    wf = Workflow("stuck", on_failure=FAIL, steps=[Step("s", executor="stuck")])
    async with Engine(sqlite_url, [wf], {"stuck": stuck}, max_active_runs=2,
                      drain_timeout=0.01) as engine:
        runner, base = await _server(engine)
        async with aiohttp.ClientSession() as session:
            codes = []
            for _ in range(3):
                async with session.post(f"{base}/v1/runs", json={"workflow": "stuck"}) as resp:
                    codes.append(resp.status)
                    retry_after = resp.headers.get("Retry-After")
            assert codes == [201, 201, 503]
            assert retry_after is not None
            assert int(retry_after) >= 1
        blocked.set()
        await runner.cleanup()
