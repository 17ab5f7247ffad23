"""The HTTP API over a real loopback server: routes, auth, errors, SSE, backpressure."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from pydantic import BaseModel
from rulebound.adapters.http.server import create_app, serve
from rulebound.domain import FAIL, Step, WaitForSignal, Workflow
from rulebound.domain.errors import RuleboundError
from rulebound.engine import Engine, Task

from tests import loopback


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


async def _server(engine: Engine, token: str | None = None,
                  **options: Any) -> tuple[web.AppRunner, str]:
    runner = await loopback.serve(create_app(engine, token=token, **options))
    return runner, loopback.base_url(runner)


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
    ("GET", "/v1/runs/00000000-0000-4000-8000-000000000000/events?after=3", {}, 404),
    ("GET", "/v1/runs/00000000-0000-4000-8000-000000000000/events",
     {"headers": {"Last-Event-ID": "5"}}, 404),
    ("GET", "/v1/runs/00000000-0000-4000-8000-000000000000/events?follow=1",
     {"headers": {"Last-Event-ID": "5"}}, 404),
    ("GET", "/v1/runs/00000000-0000-4000-8000-000000000000/events",
     {"headers": {"Last-Event-ID": str(2**64)}}, 400),  # once a 500 (found by the fuzz test)
    ("GET", "/v1/runs/00000000-0000-4000-8000-000000000000/events?follow=1",
     {"headers": {"Last-Event-ID": "-1"}}, 400),
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
    assert "rulebound_grant_overruns_total 0" in text
    _, doc, _ = await client.call("GET", "/openapi.json")
    assert doc["openapi"].startswith("3.")
    routes = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    app_routes = {(r.method, r.resource.canonical) for r in create_app(client.engine).router
                  .routes() if r.method != "HEAD"
                  # the web console's page and files, not the API (tests/console)
                  and r.resource.canonical not in ("/", "/console/{name}")}
    assert app_routes == routes


async def test_bearer_token_guards_every_v1_route(sqlite_url: str) -> None:
    async with Engine(sqlite_url, workflows(), {"echo": echo}) as engine:
        run_id = await engine.start("approval", {})
        runner, base = await _server(engine, token="s3cret-token")
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{base}/openapi.json") as resp:
                doc = await resp.json()
            operations = [(method.upper(), path, op) for path, ops in doc["paths"].items()
                          for method, op in ops.items()]
            v1 = [(m, p) for m, p, _ in operations if p.startswith("/v1/")]
            assert len(v1) == 12  # every route of the API is in the document
            for method, path, op in operations:
                if not path.startswith("/v1/"):
                    assert op.get("security") == []
                    async with session.request(method, base + path) as resp:
                        assert resp.status == 200, path  # health, metrics, the document
                    continue
                assert "401" in op["responses"], (method, path)
                url = base + path.format(run_id=run_id, name="go")
                before = engine.storage.store.last_position()
                for headers in ({}, {"Authorization": "Bearer wrong"},
                                {"Authorization": "s3cret-token"},
                                {"Authorization": "Bearer s3cret-toke"},
                                {"Authorization": "Bearer s3cret-token-and-more"}):
                    async with session.request(method, url, headers=headers,
                                               json={"workflow": "order"}) as resp:
                        assert resp.status == 401, (method, path, headers)
                        assert resp.headers["WWW-Authenticate"] == "Bearer"
                        body = await resp.json()
                        assert body["error"]["type"] == "unauthorized"
                        assert "s3cret" not in json.dumps(body)
                assert engine.storage.store.last_position() == before, (method, path)
            for method, path in v1:  # and the right token opens every one of them
                if method == "POST":
                    continue  # (they would start, signal and cancel runs)
                url = base + path.format(run_id=run_id, name="approval")
                async with session.request(
                    method, url, headers={"Authorization": "Bearer s3cret-token"}) as resp:
                    assert resp.status == 200, (method, path)
            async with session.post(f"{base}/v1/runs/{run_id}/cancel",
                                    headers={"Authorization": "Bearer s3cret-token"}) as resp:
                assert resp.status == 202
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


async def test_events_after_the_end_of_a_real_run_is_an_empty_list(client: Client) -> None:
    _, started, _ = await client.call("POST", "/v1/runs", json={"workflow": "approval"})
    run_id = started["run_id"]
    events = await client.engine.events(run_id)
    status, body, _ = await client.call("GET", f"/v1/runs/{run_id}/events?after=50")
    assert (status, body) == (200, [])
    status, body, _ = await client.call("GET", f"/v1/runs/{run_id}/events",
                                        headers={"Last-Event-ID": str(len(events) - 1)})
    assert status == 200
    assert [e["seq"] for e in body] == [len(events)]


async def test_a_client_leaving_an_event_stream_is_quiet_and_frees_the_watcher(
    sqlite_url: str, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    async with Engine(sqlite_url, workflows(), {"echo": echo}) as engine:
        runner, base = await _server(engine, keepalive=0.05)
        run_id = await engine.start("approval", {})
        async with aiohttp.ClientSession() as session:
            resp = await session.get(f"{base}/v1/runs/{run_id}/events?follow=1")
            assert resp.status == 200
            lines: list[str] = []
            while ": keepalive" not in lines:
                raw = await asyncio.wait_for(resp.content.readline(), 5)
                lines.append(raw.decode().rstrip("\n"))
            assert any(line.startswith("event: RunStarted") for line in lines)
            assert engine.followers == 1
            resp.close()  # the client goes away while the run waits for its signal
            for _ in range(100):
                if not engine.followers:
                    break
                await asyncio.sleep(0.02)
            assert engine.followers == 0  # noticed by the next keepalive, not the next event
        await engine.cancel(run_id, "done")
        await runner.cleanup()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], [r.getMessage() for r in errors]
    assert "unhandled error" not in caplog.text


async def _until_waiting(engine: Engine, run_id: Any) -> None:
    for _ in range(500):
        if (await engine.get(run_id)).waiting_for:
            return
        await asyncio.sleep(0.01)
    pytest.fail(f"run {run_id} never came to wait for its signal")


async def test_shutdown_ends_open_event_streams_promptly(sqlite_url: str) -> None:
    """A follower of a waiting run (default keepalive, so its stream looks alive) must not
    hold the server's shutdown for aiohttp's shutdown timeout (60 s by default)."""
    async with Engine(sqlite_url, workflows(), {"echo": echo}) as engine:
        runner, base = await _server(engine)
        run_id = await engine.start("approval", {})
        await _until_waiting(engine, run_id)
        async with aiohttp.ClientSession() as session:
            resp = await session.get(f"{base}/v1/runs/{run_id}/events?follow=1")
            assert resp.status == 200
            assert (await asyncio.wait_for(resp.content.readline(), 5)).startswith(b"id: 1")
            assert engine.followers == 1
            started = time.monotonic()
            await asyncio.wait_for(runner.cleanup(), 10)
            took = time.monotonic() - started
            assert took < 2.0, f"shutdown took {took:.1f} s with a follower attached"
            rest = await asyncio.wait_for(resp.content.read(), 5)  # the stream ended ...
            assert b"keepalive" not in rest
            assert engine.followers == 0  # ... and its watcher is gone
        await engine.cancel(run_id, "done")


def _approval(timeout: int) -> Workflow:
    return Workflow("approval", on_failure=FAIL, steps=[
        WaitForSignal("wait", signal="go", timeout=timeout, next="done"),
        Step("done", executor="echo")])


async def test_signals_and_cancels_to_a_held_run_say_it_is_held(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'held.db'}"
    async with Engine(url, [_approval(60)], {"echo": echo}) as engine:
        run_id = await engine.start("approval", {})
        await _until_waiting(engine, run_id)
    # restarted with only a newer version of the workflow: the run cannot go on
    async with Engine(url, [_approval(120)], {"echo": echo}) as engine:
        runner, base = await _server(engine)
        async with aiohttp.ClientSession() as session:
            client = Client(session, base, engine)
            status, view, _ = await client.call("GET", f"/v1/runs/{run_id}")
            assert view["status"] == "held"
            before = engine.storage.store.last_position()
            for path, body in ((f"/v1/runs/{run_id}/signals/go", {}),
                               (f"/v1/runs/{run_id}/cancel", {"reason": "x"})):
                status, answer, _ = await client.call("POST", path, json=body)
                assert status == 409, answer
                assert answer["error"]["type"] == "run_held"
                assert "is held" in answer["error"]["message"]
                assert "not registered" in answer["error"]["message"]
            assert engine.storage.store.last_position() == before
            _, doc, _ = await client.call("GET", "/openapi.json")
            assert "run_held" in doc["paths"]["/v1/runs/{run_id}/cancel"]["post"][
                "responses"]["409"]["description"]
            assert "run_held" in json.dumps(doc["components"]["schemas"]["ErrorDetail"])
        await runner.cleanup()
