"""Fuzz the HTTP API from its own /openapi.json: >= 2,000 requests, no 5xx, JSON 4xx bodies.

Requests are generated with hypothesis from the served OpenAPI document: for each operation,
path parameters (real run ids, random UUIDs, junk), query parameters and headers by their
schemas, and bodies by their schemas — mixed with deliberately wrong data (wrong types,
unknown fields, malformed JSON, the wrong content type). The server is real, on loopback,
over a real SQLite store.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel
from rulebound.adapters.http.server import create_app
from rulebound.domain import FAIL, Step, WaitForSignal, Workflow
from rulebound.engine import Engine, Task

from tests import loopback

REQUESTS = 2200
COUNTS: Counter[str] = Counter()


class Order(BaseModel):
    item: str
    qty: int


async def echo(task: Task) -> Any:
    return {"got": task.input}


class LiveServer:
    """An engine and its HTTP app on a loop in a background thread."""

    def __init__(self, db: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.db = db
        self.port = 0
        self.run_ids: list[str] = []
        self.thread = threading.Thread(target=self._main, daemon=True)
        self.thread.start()
        assert self.ready.wait(30), "the server did not start"

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._start())
        self.loop.run_forever()
        self.loop.run_until_complete(self._stop())

    async def _start(self) -> None:
        workflows = [
            Workflow("order", input_schema=Order, on_failure=FAIL,
                     steps=[Step("place", executor="echo")]),
            Workflow("approval", on_failure=FAIL, steps=[
                WaitForSignal("wait", signal="go", timeout=3600, next="done"),
                Step("done", executor="echo")]),
        ]
        self.engine = Engine(f"sqlite:///{self.db}", workflows, {"echo": echo})
        await self.engine.open()
        finished = await self.engine.start("order", {"item": "x", "qty": 1})
        await self.engine.wait(finished, timeout=10)
        waiting = await self.engine.start("approval", {})
        self.run_ids = [str(finished), str(waiting)]
        self.runner = await loopback.serve(create_app(self.engine))
        self.port = loopback.port(self.runner)
        self.ready.set()

    async def _stop(self) -> None:
        await self.runner.cleanup()
        await self.engine.close()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)

    def last_position(self) -> int:
        return asyncio.run_coroutine_threadsafe(
            self.engine.storage.call(self.engine.storage.store.last_position), self.loop
        ).result(10)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    live = LiveServer(tmp_path_factory.mktemp("fuzz") / "runs.db")
    yield live
    live.stop()


def request(server: LiveServer, method: str, path: str, body: bytes | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, str, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        ctype = resp.getheader("Content-Type", "")
        # A followed event stream stays open until the run ends: the headers are enough.
        data = b"" if ctype.startswith("text/event-stream") else resp.read()
        return resp.status, ctype, data
    finally:
        conn.close()


# --- strategies from the OpenAPI document ------------------------------------------------

ANY_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=False,
                                                                         allow_infinity=False)
    | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=3), max_leaves=6)


def from_schema(schema: dict[str, Any], doc: dict[str, Any]) -> st.SearchStrategy[Any]:
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        return from_schema(doc["components"]["schemas"][name], doc)
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    kind = schema.get("type")
    if kind == "string":
        if schema.get("format") == "uuid":
            return st.uuids().map(str)
        return st.text(min_size=schema.get("minLength", 0),
                       max_size=min(schema.get("maxLength", 40), 40))
    if kind == "integer":
        return st.integers(schema.get("minimum", -(10**6)), schema.get("maximum", 10**6))
    if kind == "array":
        return st.lists(from_schema(schema.get("items", {}), doc), max_size=3)
    if kind == "object":
        props = schema.get("properties", {})
        required = set(schema.get("required", ()))
        return st.fixed_dictionaries(
            {k: from_schema(v, doc) for k, v in props.items() if k in required},
            optional={k: from_schema(v, doc) for k, v in props.items() if k not in required})
    return ANY_JSON


@st.composite
def api_requests(draw: st.DrawFn, doc: dict[str, Any], run_ids: list[str]
                 ) -> tuple[str, str, bytes | None, dict[str, str]]:
    operations = [(path, method, op) for path, ops in sorted(doc["paths"].items())
                  for method, op in sorted(ops.items())]
    path, method, op = draw(st.sampled_from(operations))
    wrong = draw(st.integers(0, 3)) == 0  # a quarter of the requests are deliberately wrong
    query: dict[str, Any] = {}
    headers: dict[str, str] = {}
    for param in op.get("parameters", []):
        where, name = param["in"], param["name"]
        if where == "path":
            if name == "run_id":
                value = draw(st.sampled_from(run_ids) | st.uuids().map(str)
                             | st.text(min_size=1, max_size=12))
            else:
                value = draw(from_schema(param["schema"], doc)) or "x"
            path = path.replace("{" + name + "}", quote(str(value), safe=""))
        elif draw(st.booleans()):
            value = draw(st.text(max_size=8) if wrong else from_schema(param["schema"], doc))
            if where == "query":
                query[name] = value
            elif where == "header" and all(32 <= ord(c) < 127 for c in str(value)):
                # HTTP forbids control characters in header values; aiohttp's parser rejects
                # them before the app runs (see the protocol test below).
                headers[name] = str(value)
    if query:
        path += "?" + urlencode(query)
    body: bytes | None = None
    content = op.get("requestBody", {}).get("content", {}).get("application/json")
    if content is not None and draw(st.booleans() if not op["requestBody"].get("required")
                                    else st.just(True)):
        choice = draw(st.integers(0, 9))
        if choice == 0:
            body, headers["Content-Type"] = b"{not json", "application/json"
        elif choice == 1:
            body, headers["Content-Type"] = b"<xml/>", "text/xml"
        else:
            value = draw(ANY_JSON if wrong else from_schema(content["schema"], doc))
            if isinstance(value, dict) and value.get("workflow") and not wrong:
                value["workflow"] = draw(st.sampled_from(["order", "approval", value[
                    "workflow"]]))
            body, headers["Content-Type"] = json.dumps(value).encode(), "application/json"
    return method.upper(), path, body, headers


def test_the_api_never_answers_5xx_to_generated_requests(server: LiveServer) -> None:
    status, _, raw = request(server, "GET", "/openapi.json")
    assert status == 200
    doc = json.loads(raw)

    @settings(max_examples=REQUESTS, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(req=api_requests(doc, server.run_ids))
    def one(req: tuple[str, str, bytes | None, dict[str, str]]) -> None:
        method, path, body, headers = req
        status, ctype, data = request(server, method, path, body, headers)
        COUNTS["requests"] += 1
        COUNTS[str(status)[0] + "xx"] += 1
        assert status < 500, (method, path, body, status, data[:300])
        if status >= 400:
            error = json.loads(data)["error"]
            assert error["type"]
            assert error["message"]
        elif ctype.startswith("application/json"):
            json.loads(data)

    one()
    print(f"fuzz requests by class: {dict(COUNTS)}")
    assert COUNTS["requests"] >= 2000
    assert COUNTS["2xx"] > 100  # valid requests got through, not only rejections
    assert COUNTS["4xx"] > 100


def test_protocol_garbage_gets_a_4xx_never_a_5xx(server: LiveServer) -> None:
    import socket

    for raw in (b"GET /v1/runs HTTP/1.1\r\nHost: x\r\nIdempotency-Key: \x01\r\n\r\n",
                b"NOT-HTTP\r\n\r\n", b"GET / HTTP/9.9\r\n\r\n"):
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            sock.sendall(raw)
            reply = sock.recv(200)
        status = int(reply.split(b" ", 2)[1])
        assert 400 <= status < 500, reply


@settings(max_examples=150, deadline=None, database=None)
@given(bad=st.sampled_from([
    ("POST", "/v1/runs", b"{not json", "application/json"),
    ("POST", "/v1/runs", b'{"workflow": 3}', "application/json"),
    ("POST", "/v1/runs", b'{"workflow": "order", "input": {"item": 1}}', "application/json"),
    ("POST", "/v1/runs", b'{"workflow": "nope"}', "application/json"),
    ("POST", "/v1/runs", b'{"workflow": "order", "extra": 1}', "application/json"),
    ("POST", "/v1/runs/not-a-run/cancel", b"", "application/json"),
    ("POST", "/v1/runs/00000000-0000-4000-8000-000000000000/signals/go", b"{}",
     "application/json"),
]), junk=st.binary(max_size=30))
def test_rejected_requests_append_nothing(server: LiveServer, bad: tuple[str, str, bytes, str],
                                          junk: bytes) -> None:
    before = server.last_position()
    method, path, body, ctype = bad
    status, _, _ = request(server, method, path, body + (junk if body == b"{not json" else b""),
                           {"Content-Type": ctype})
    assert 400 <= status < 500
    finished = server.run_ids[0]  # signals and cancels to a finished run are refused too
    assert request(server, "POST", f"/v1/runs/{finished}/cancel")[0] == 409
    assert request(server, "POST", f"/v1/runs/{finished}/signals/go", b"{}",
                   {"Content-Type": "application/json"})[0] == 409
    assert server.last_position() == before
