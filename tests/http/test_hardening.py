"""The HTTP API's edges, over a real loopback server: every error class has a deliberate
status, bad bytes and huge numbers are 4xx (never a 500), and /openapi.json agrees with what
the server enforces, constraint by constraint."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any
from uuid import UUID

import aiohttp
import pytest
from rulebound.adapters.http.server import ERROR_STATUS, create_app, status_of
from rulebound.domain import FAIL, Step, WaitForSignal, Workflow
from rulebound.engine import Engine, Task
from rulebound.engine.errors import Conflict
from rulebound.engine.store import ConcurrencyConflict, EventStore, StoreError
from rulebound.engine.stores import open_store

import rulebound
from tests import loopback

TOKEN = "s3cret-token-for-tests"


async def echo(task: Task) -> Any:
    return {"got": task.input}


def workflows() -> list[Workflow]:
    return [
        Workflow("echo", on_failure=FAIL, steps=[Step("place", executor="echo")]),
        Workflow("approval", on_failure=FAIL, steps=[
            WaitForSignal("wait", signal="go", timeout=600, next="done"),
            Step("done", executor="echo")]),
    ]


class FlakyStore:
    """An EventStore that passes everything to a real one, except that listing runs raises
    `fail` when it is set (a store outage, or a conflict, as the engine would see it)."""

    def __init__(self, inner: EventStore) -> None:
        self.inner = inner
        self.fail: Exception | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def list_runs(self, *args: Any, **kwargs: Any) -> Any:
        if self.fail is not None:
            raise self.fail
        return self.inner.list_runs(*args, **kwargs)


class Live:
    def __init__(self, engine: Engine, base: str, session: aiohttp.ClientSession,
                 store: FlakyStore) -> None:
        self.engine, self.base, self.session, self.store = engine, base, session, store
        self.port = int(base.rsplit(":", 1)[1])

    async def call(self, method: str, path: str, **kw: Any) -> tuple[int, Any, Any]:
        async with self.session.request(method, self.base + path, **kw) as resp:
            text = await resp.text()
            assert "Traceback" not in text
            body: Any = await resp.json() if resp.content_type == "application/json" else text
            return resp.status, body, resp.headers

    async def raw(self, request: bytes) -> tuple[int, dict[str, str], bytes]:
        """Send bytes as they are (what a client library would refuse to send)."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            writer.write(request)
            await writer.drain()
            data = await asyncio.wait_for(reader.read(), 10)
        finally:
            writer.close()
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])}
        return int(lines[0].split()[1]), headers, body

    async def waiting_run(self) -> UUID:
        return await self.engine.start("approval", {})


async def _live(token: str | None = None) -> AsyncIterator[Live]:
    store = FlakyStore(open_store("memory://"))
    async with Engine(store, workflows(), {"echo": echo}) as engine:
        runner = await loopback.serve(create_app(engine, token=token))
        async with aiohttp.ClientSession() as session:
            yield Live(engine, loopback.base_url(runner), session, store)
        await runner.cleanup()


@pytest.fixture
async def live() -> AsyncIterator[Live]:
    async for running in _live():
        yield running


@pytest.fixture
async def guarded() -> AsyncIterator[Live]:
    async for running in _live(token=TOKEN):
        yield running


# --- every error class has a deliberate status ------------------------------------------

def _public_errors() -> list[type[BaseException]]:
    found = [getattr(rulebound, name) for name in rulebound.__all__]
    return [c for c in found if isinstance(c, type) and issubclass(c, rulebound.RuleboundError)]


def test_every_public_error_class_has_a_deliberate_status() -> None:
    errors = [*_public_errors(), Conflict]
    assert len(errors) >= 15  # the face exports the error tree
    missing = [c.__name__ for c in errors if c not in ERROR_STATUS]
    assert missing == [], f"add these to ERROR_STATUS in adapters/http/server.py: {missing}"
    for cls in errors:
        status = ERROR_STATUS[cls]
        assert 400 <= status.status < 600, cls
        assert status.kind and status.kind.islower(), cls


@pytest.mark.parametrize(("error", "status", "kind"), [
    (StoreError("database is locked"), 503, "store_unavailable"),
    (ConcurrencyConflict("two writers"), 409, "conflict"),
    (Conflict("key k was used with another input"), 409, "conflict"),
    (rulebound.RunNotFound("no run x"), 404, "not_found"),
    (rulebound.InvalidInput("bad"), 422, "invalid_input"),
])
def test_errors_are_answered_by_their_own_entry_or_their_nearest_base(
    error: Exception, status: int, kind: str,
) -> None:
    found = status_of(error)
    assert found is not None
    assert (found.status, found.kind) == (status, kind)


async def test_a_store_error_is_503_with_retry_after_and_no_store_detail(
    live: Live, caplog: pytest.LogCaptureFixture,
) -> None:
    live.store.fail = StoreError("could not connect to postgresql://app:hunter2@db/runs")
    status, body, headers = await live.call("GET", "/v1/runs")
    assert status == 503
    assert body["error"]["type"] == "store_unavailable"
    assert int(headers["Retry-After"]) >= 1
    assert "hunter2" not in str(body)  # the store's own message stays in the log
    assert "Traceback" not in caplog.text  # an outage, logged as one line
    live.store.fail = ConcurrencyConflict("another writer got there first")
    status, body, _ = await live.call("GET", "/v1/runs")
    assert (status, body["error"]["type"]) == (409, "conflict")
    live.store.fail = None
    assert (await live.call("GET", "/v1/runs"))[0] == 200


# --- bytes that once reached a 500 ---------------------------------------------------------

async def test_a_non_utf8_idempotency_key_is_a_400(live: Live) -> None:
    body = b'{"workflow": "echo", "input": 1}'
    status, headers, answer = await live.raw(
        b"POST /v1/runs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Idempotency-Key: caf\xe9-\xff\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
        % (len(body), body))
    assert status == 400, answer
    assert headers["content-type"].startswith("application/json")
    assert b"Idempotency-Key" in answer and b"UTF-8" in answer
    assert await live.engine.runs() == []  # nothing started


async def test_a_non_utf8_authorization_header_is_a_401_and_logs_nothing(
    guarded: Live, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    for value in (b"Bearer \xff\xfe", b"Bearer s3cret-token-for-tests\xe9", b"\xc3\x28"):
        status, _headers, answer = await guarded.raw(
            b"GET /v1/runs HTTP/1.1\r\nHost: x\r\nAuthorization: %s\r\n"
            b"Connection: close\r\n\r\n" % value)
        assert status == 401, answer
        assert b'"unauthorized"' in answer
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert "Traceback" not in caplog.text


@pytest.mark.parametrize("number", [2**64, -(2**63) - 1, 10**30])
async def test_integers_beyond_64_bits_are_refused_not_rounded(live: Live, number: int) -> None:
    raw = b'{"workflow": "echo", "input": {"n": %d}}' % number
    status, body, _ = await live.call("POST", "/v1/runs", data=raw,
                                      headers={"Content-Type": "application/json"})
    assert status == 400, body
    assert "beyond 64 bits" in body["error"]["message"]
    run_id = await live.waiting_run()
    status, body, _ = await live.call("POST", f"/v1/runs/{run_id}/signals/go",
                                      data=b'[%d]' % number,
                                      headers={"Content-Type": "application/json"})
    assert status == 400, body
    assert len(await live.engine.events(run_id)) == len(await live.engine.events(run_id, 0))
    assert (await live.engine.get(run_id)).waiting_for  # the signal was not recorded


async def test_the_largest_integers_that_fit_are_kept_exactly(live: Live) -> None:
    big, small = 2**64 - 1, -(2**63)
    raw = b'{"workflow": "echo", "input": {"big": %d, "small": %d, "text": "%d"}}' % (
        big, small, 10**40)
    status, body, _ = await live.call("POST", "/v1/runs", data=raw,
                                      headers={"Content-Type": "application/json"})
    assert status == 201, body
    view = await live.engine.wait(body["run_id"], timeout=5)
    assert view.output == {"got": {"big": big, "small": small, "text": str(10**40)}}


# --- the document and the validation agree -------------------------------------------------

def _edges(schema: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(constraint, a value just outside it, a value just inside it) for each constraint."""
    out: list[tuple[str, Any, Any]] = []
    if "maximum" in schema:
        out.append(("maximum", schema["maximum"] + 1, schema["maximum"]))
    if "minimum" in schema:
        out.append(("minimum", schema["minimum"] - 1, schema["minimum"]))
    if "maxLength" in schema:
        n = schema["maxLength"]
        out.append(("maxLength", "k" * (n + 1), "k" * n))
    if schema.get("minLength", 0) > 0:
        n = schema["minLength"]
        out.append(("minLength", "k" * (n - 1), "k" * n))
    if "enum" in schema:
        out.append(("enum", "not-in-the-enum", schema["enum"][0]))
    return out


def _resolve(schema: dict[str, Any], doc: dict[str, Any]) -> dict[str, Any]:
    if "$ref" in schema:
        return doc["components"]["schemas"][schema["$ref"].rsplit("/", 1)[-1]]
    return schema


def _cases(doc: dict[str, Any]) -> list[tuple[str, str, str, str, str, Any, Any]]:
    """Every declared constraint of every parameter and body field in the document."""
    cases = []
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            for param in op.get("parameters", []):
                for rule, bad, good in _edges(param["schema"]):
                    if param["in"] == "path" and rule == "minLength":
                        continue  # an empty path segment is another URL: the router's 404
                    cases.append((method.upper(), path, param["in"], param["name"], rule, bad,
                                  good))
            body = op.get("requestBody", {}).get("content", {}).get("application/json")
            if body is None:
                continue
            schema = _resolve(body["schema"], doc)
            for name, prop in schema.get("properties", {}).items():
                for option in prop.get("anyOf", [prop]):
                    for rule, bad, good in _edges(option):
                        cases.append((method.upper(), path, "body", name, rule, bad, good))
    return cases


async def _send(live: Live, method: str, path: str, where: str, name: str,
                value: Any) -> tuple[int, Any]:
    run_id = str(await live.waiting_run())  # a fresh run: starts and cancels change it
    params = {"run_id": run_id, "name": "go"}
    query: dict[str, str] = {}
    headers: dict[str, str] = {}
    body: dict[str, Any] | None = {"workflow": "echo"} if path == "/v1/runs" else None
    if where == "path":
        params[name] = str(value)
    elif where == "query":
        query[name] = str(value)
    elif where == "header":
        headers[name] = str(value)
    else:
        body = {**(body or {}), name: value}
    url = live.base + path.format(**params)
    if method == "POST" and body is None:
        body = {}
    kw: dict[str, Any] = {"params": query, "headers": headers}
    if body is not None and method == "POST":
        kw["json"] = body
    status, answer, _ = await live.call(method, url[len(live.base):], **kw)
    return status, answer


async def test_every_declared_constraint_is_enforced_at_its_edge(live: Live) -> None:
    _, doc, _ = await live.call("GET", "/openapi.json")
    cases = _cases(doc)
    declared = {(m, p, w, n, r) for m, p, w, n, r, _, _ in cases}
    # the constraints the issue found undeclared or unenforced are among them
    assert ("GET", "/v1/runs", "query", "workflow", "maxLength") in declared
    assert ("GET", "/v1/runs", "query", "offset", "maximum") in declared
    assert ("GET", "/v1/runs/{run_id}/events", "header", "Last-Event-ID", "maximum") in declared
    assert ("POST", "/v1/runs", "header", "Idempotency-Key", "minLength") in declared
    assert ("POST", "/v1/runs", "body", "idempotency_key", "maxLength") in declared
    assert ("POST", "/v1/runs/{run_id}/signals/{name}", "path", "name", "maxLength") in declared
    failures: list[str] = []
    for method, path, where, name, rule, bad, good in cases:
        what = f"{method} {path} {where} {name} {rule}"
        status, answer = await _send(live, method, path, where, name, bad)
        if status != 400:
            failures.append(f"{what}: {str(bad)[:20]!r} answered {status}, not 400")
        elif name not in answer["error"]["message"]:
            failures.append(f"{what}: the refusal does not name {name!r}: {answer}")
        status, answer = await _send(live, method, path, where, name, good)
        if status == 400 or status >= 500:
            failures.append(f"{what}: {str(good)[:20]!r} answered {status}: {answer}")
    assert failures == [], "\n".join(failures)
    assert len(cases) >= 15


async def test_the_body_key_is_checked_even_with_a_header_and_must_agree(live: Live) -> None:
    for key in ("", "k" * 201):
        status, body, _ = await live.call("POST", "/v1/runs", headers={"Idempotency-Key": "a"},
                                          json={"workflow": "echo", "idempotency_key": key})
        assert status == 400, body
        assert "idempotency_key" in body["error"]["message"]
    status, body, _ = await live.call("POST", "/v1/runs", headers={"Idempotency-Key": "a"},
                                      json={"workflow": "echo", "idempotency_key": "b"})
    assert status == 400
    assert "differ" in body["error"]["message"]
    first = await live.call("POST", "/v1/runs", headers={"Idempotency-Key": "same"},
                            json={"workflow": "echo", "idempotency_key": "same"})
    second = await live.call("POST", "/v1/runs", json={"workflow": "echo",
                                                       "idempotency_key": "same"})
    assert (first[0], second[0]) == (201, 200)
    assert first[1]["run_id"] == second[1]["run_id"]
    assert len(await live.engine.runs()) == 1


async def test_answers_match_their_documented_schemas(live: Live) -> None:
    """Each answer is built through the model the document names: spot-check required
    fields of the documented schemas against real answers."""
    _, doc, _ = await live.call("GET", "/openapi.json")
    schemas = doc["components"]["schemas"]
    run_id = await live.waiting_run()
    answers: Sequence[tuple[str, str]] = (
        ("/v1/runs", "RunList"), (f"/v1/runs/{run_id}", "Run"),
        ("/v1/workflows", "WorkflowList"), ("/v1/workflows/approval", "WorkflowGraph"),
        ("/healthz", "Health"))
    for path, name in answers:
        status, body, _ = await live.call("GET", path)
        assert status == 200, (path, body)
        required = set(schemas[name].get("required", ()))
        assert required <= set(body), (path, required - set(body))


# --- retries of ambiguous requests: keys and ids --------------------------------------------

async def test_a_signal_sent_twice_with_one_idempotency_key_is_recorded_once(live: Live) -> None:
    run_id = await live.waiting_run()
    status, body, _ = await live.call("POST", f"/v1/runs/{run_id}/signals/stop")
    assert status == 422 and "no step waiting for signal 'stop'" in body["error"]["message"]
    for _ in range(2):  # the client did not trust the first answer
        status, _, _ = await live.call("POST", f"/v1/runs/{run_id}/signals/go", json={},
                                       headers={"Idempotency-Key": "approval-7"})
        assert status == 202
    status, body, _ = await live.call("POST", f"/v1/runs/{run_id}/signals/stop",
                                      headers={"Idempotency-Key": "approval-7"})
    assert status == 409 and "'approval-7'" in body["error"]["message"]  # another signal
    view = await live.engine.wait(run_id, timeout=10)
    assert view.status == "completed"
    types = [e.type for e in await live.engine.events(run_id)]
    assert types.count("SignalReceived") == 1


async def test_an_idempotency_key_reused_with_another_input_is_409(live: Live) -> None:
    body = {"workflow": "echo", "input": {"n": 1}}
    headers = {"Idempotency-Key": "order-1"}
    first, _, _ = await live.call("POST", "/v1/runs", json=body, headers=headers)
    again, _, _ = await live.call("POST", "/v1/runs", json=body, headers=headers)
    other, answer, _ = await live.call("POST", "/v1/runs", json={**body, "input": {"n": 2}},
                                       headers=headers)
    assert (first, again, other) == (201, 200, 409)
    assert answer["error"]["type"] == "idempotency_conflict"
    assert "'order-1'" in answer["error"]["message"]


async def test_event_stream_ids_are_stored_positions(live: Live) -> None:
    run_id = await live.waiting_run()
    stored = await live.engine.events(run_id)
    # Resume after event 1 of a waiting run: the ids continue from the stored positions.
    async with live.session.get(f"{live.base}/v1/runs/{run_id}/events?follow=1",
                                headers={"Last-Event-ID": "1"}) as resp:
        first = (await asyncio.wait_for(resp.content.readline(), 5)).decode()
    assert first == "id: 2\n" and len(stored) >= 2


async def test_metrics_answer_during_a_store_outage_and_show_the_kept_results() -> None:
    store = rulebound.FaultyStore(open_store("memory://"), blocking=True, announce=None)

    async def during_an_outage(task: Task) -> Any:
        store.outage(60)
        return {"ok": True}

    wf = Workflow("outage", on_failure=FAIL, steps=[Step("s", executor="o")])
    async with Engine(store, [wf], {"o": during_an_outage}) as engine:
        runner = await loopback.serve(create_app(engine))
        run_id = await engine.start("outage")
        async with asyncio.timeout(10):
            while engine.results_pending == 0:
                await asyncio.sleep(0.01)
        async with aiohttp.ClientSession() as session, session.get(
                f"{loopback.base_url(runner)}/metrics") as resp:
            text = await resp.text()
        assert resp.status == 200
        assert "rulebound_store_up 0" in text and "rulebound_results_pending 1" in text
        store.heal()
        assert (await engine.wait(run_id, timeout=10)).status == "completed"
        assert engine.results_pending == 0
        await runner.cleanup()
