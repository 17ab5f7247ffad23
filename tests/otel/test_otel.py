"""OpenTelemetry traces of runs, checked with the SDK's in-memory exporter, over HTTP."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from uuid import UUID

import aiohttp
import pytest
from aiohttp import web
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from pydantic import BaseModel
from rulebound.adapters.http.server import create_app
from rulebound.adapters.otel import instrument
from rulebound.domain import END, FAIL, WaitForSignal
from rulebound.engine import Engine
from rulebound.engine.executor import Result, RetryableError, Task, Usage

from rulebound import Retry, Step, Workflow
from tests import loopback

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
CANARY = "canary-otel-5d1c0b7e9a"


class Answer(BaseModel):
    text: str


class Go(BaseModel):
    ok: bool


class Model:
    """A model executor (it spends tokens) whose first attempt fails quoting its API key."""

    spends_tokens = True
    model = "tiny-model-1"

    def secret_values(self) -> list[str]:
        return [CANARY]

    async def __call__(self, task: Task) -> Result:
        if task.attempt == 1:
            raise RetryableError(f"429 for key {CANARY}", kind="rate_limited")
        return Result({"text": "hi"}, Usage(tokens_in=12, tokens_out=5, cost=0.0007))


async def tool(data: Any) -> dict[str, Any]:
    return {"done": True}


def workflow() -> Workflow:
    return Workflow("traced", on_failure=FAIL, steps=[
        Step("ask", executor="model", output=Answer, timeout=5, max_tokens=100, cost=0.01,
             config={"model": "tiny-model-2"},
             retry=Retry(attempts=3, backoff=0.01, on=("rate_limited",)), next="wait"),
        WaitForSignal("wait", signal="go", timeout=60, output=Go, next="finish",
                      on_timeout="finish"),
        Step("finish", executor="tool", timeout=5, next=END),
    ])


class Served:
    def __init__(self, engine: Engine, base: str, session: aiohttp.ClientSession) -> None:
        self.engine, self.base, self.session = engine, base, session

    async def post(self, path: str, body: Any, **headers: str) -> Any:
        async with self.session.post(self.base + path, json=body, headers=headers) as resp:
            assert resp.status < 300, await resp.text()
            return await resp.json()


async def _serve(engine: Engine) -> tuple[web.AppRunner, str]:
    runner = await loopback.serve(create_app(engine))
    return runner, loopback.base_url(runner)


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


def _provider(exporter: InMemorySpanExporter) -> TracerProvider:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider


async def _engine(url: str) -> Engine:
    return Engine(url, [workflow()], {"model": Model(), "tool": tool})


async def _wait(engine: Engine, run_id: str, check: Any) -> None:
    for _ in range(400):
        view = await engine.get(run_id)
        if check(view):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"run {run_id}: {view.status} {view.waiting_for}")


@pytest.fixture
async def served(sqlite_url: str, exporter: InMemorySpanExporter) -> AsyncIterator[Served]:
    engine = await _engine(sqlite_url)
    tracing = instrument(engine, _provider(exporter))
    async with engine:
        runner, base = await _serve(engine)
        async with aiohttp.ClientSession() as session:
            yield Served(engine, base, session)
        await runner.cleanup()
    tracing.close()


def _attrs(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


async def test_a_run_span_and_a_child_span_per_attempt(served: Served,
                                                       exporter: InMemorySpanExporter) -> None:
    started = await served.post("/v1/runs", {"workflow": "traced", "input": None},
                                traceparent=TRACEPARENT)
    run_id = started["run_id"]
    await _wait(served.engine, run_id, lambda v: "go" in v.waiting_for)
    await served.post(f"/v1/runs/{run_id}/signals/go", {"ok": True})
    await _wait(served.engine, run_id, lambda v: v.terminal)
    spans = exporter.get_finished_spans()
    run = next(s for s in spans if s.name == "run traced")
    assert f"{run.context.trace_id:032x}" == TRACE_ID  # the caller's trace
    assert run.parent is not None and f"{run.parent.span_id:016x}" == PARENT_ID
    assert _attrs(run)["rulebound.status"] == "completed"
    assert _attrs(run)["rulebound.run_id"] == run_id
    children = [s for s in spans if s.parent is not None
                and s.parent.span_id == run.context.span_id]
    by_step = sorted((_attrs(s)["rulebound.step"], _attrs(s)["rulebound.attempt"],
                      _attrs(s)["rulebound.outcome"]) for s in children)
    assert by_step == [("ask", 1, "failed"), ("ask", 2, "succeeded"),
                       ("finish", 1, "succeeded")]
    model_call = next(s for s in children if _attrs(s)["rulebound.attempt"] == 2
                      and _attrs(s)["rulebound.step"] == "ask")
    assert model_call.name == "chat tiny-model-2"
    assert _attrs(model_call)["gen_ai.request.model"] == "tiny-model-2"
    assert _attrs(model_call)["gen_ai.operation.name"] == "chat"
    assert _attrs(model_call)["gen_ai.usage.input_tokens"] == 12
    assert _attrs(model_call)["gen_ai.usage.output_tokens"] == 5
    assert _attrs(model_call)["rulebound.cost_usd"] == pytest.approx(0.0007)
    failed = next(s for s in children if _attrs(s)["rulebound.attempt"] == 1)
    assert _attrs(failed)["error.type"] == "rate_limited"
    assert "gen_ai.request.model" not in _attrs(next(
        s for s in children if _attrs(s)["rulebound.step"] == "finish"))
    names = [e.name for e in run.events]
    assert "retry scheduled" in names and "signal" in names and "transition" in names
    # the canary the model quoted in its error appears in no span, attribute or event
    dumped = json.dumps([s.to_json() for s in spans])
    assert CANARY not in dumped
    assert "rate_limited" in dumped


async def test_a_run_resumed_after_a_restart_joins_the_same_trace(
        sqlite_url: str, exporter: InMemorySpanExporter) -> None:
    engine = await _engine(sqlite_url)
    tracing = instrument(engine, _provider(exporter))
    async with engine:
        runner, base = await _serve(engine)
        async with aiohttp.ClientSession() as session:
            run_id = (await Served(engine, base, session).post(
                "/v1/runs", {"workflow": "traced"}, traceparent=TRACEPARENT))["run_id"]
        await _wait(engine, run_id, lambda v: "go" in v.waiting_for)
        await runner.cleanup()
    tracing.close()
    before = exporter.get_finished_spans()
    assert {f"{s.context.trace_id:032x}" for s in before} == {TRACE_ID}
    exporter.clear()

    engine = await _engine(sqlite_url)  # a new process, in effect: nothing kept in memory
    tracing = instrument(engine, _provider(exporter))
    async with engine:
        await engine.signal(run_id, "go", {"ok": True})
        await _wait(engine, run_id, lambda v: v.terminal)
        for _ in range(100):  # the resumed run span ends with the run
            if any(s.name.startswith("run") for s in exporter.get_finished_spans()):
                break
            await asyncio.sleep(0.01)
    tracing.close()
    after = exporter.get_finished_spans()
    assert after
    assert {f"{s.context.trace_id:032x}" for s in after} == {TRACE_ID}
    run = next(s for s in after if s.name == "run traced")
    assert _attrs(run)["rulebound.resumed"] is True
    assert _attrs(run)["rulebound.status"] == "completed"
    assert f"{run.parent.span_id:016x}" == PARENT_ID  # type: ignore[union-attr]
    assert any(_attrs(s).get("rulebound.step") == "finish" for s in after)


async def test_an_invalid_traceparent_is_ignored(served: Served,
                                                 exporter: InMemorySpanExporter) -> None:
    started = await served.post("/v1/runs", {"workflow": "traced"},
                                traceparent="00-" + "0" * 32 + "-" + "1" * 16 + "-01")
    events = await served.engine.events(started["run_id"])
    assert events[0].traceparent is None  # type: ignore[attr-defined]
    stored = (await served.engine.storage.read(UUID(started["run_id"]), 0))[0].data
    assert b"traceparent" not in stored  # None is left out: old logs hash the same


NO_EXTRA = """
import sys, importlib.abc
class NoOtel(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "opentelemetry" or name.startswith("opentelemetry."):
            raise ImportError("no module named " + name + " (the otel extra is not installed)")
sys.meta_path.insert(0, NoOtel())
import asyncio, rulebound
from rulebound.adapters.http.server import create_app
from rulebound.adapters.demo.run import demo_registry
from rulebound.engine import Engine
async def main():
    async with Engine("memory://", registry=demo_registry()) as engine:
        create_app(engine)
        run = await engine.start("support-triage", {"id": "T", "customer_id": "C1",
                                 "subject": "hi", "body": "hello"})
        await engine.get(run)
asyncio.run(main())
assert not [m for m in sys.modules if m.startswith("opentelemetry")], "imported"
try:
    import rulebound.adapters.otel
except ImportError as exc:
    print("otel:", exc)
print("ok")
"""


def test_without_the_extra_nothing_is_imported() -> None:
    """With OpenTelemetry missing, the engine and the server work and import none of it; the
    same holds with it installed (nothing imports the otel module unless asked)."""
    for blocked in (True, False):
        code = NO_EXTRA if blocked else NO_EXTRA.replace("sys.meta_path.insert(0, NoOtel())",
                                                         "")
        if not blocked:
            code = code.replace("try:\n    import rulebound.adapters.otel\nexcept ImportError "
                                "as exc:\n    print(\"otel:\", exc)\n", "")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=60, cwd=Path(__file__).parent)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip().endswith("ok")
        if blocked:
            assert "otel extra is not installed" in done.stdout
