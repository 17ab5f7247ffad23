"""OpenTelemetry traces of runs (the optional extra: `pip install rulebound[otel]`).

    from rulebound.adapters.otel import instrument
    tracing = instrument(engine)          # before engine.open(): recovery is traced too
    ...
    tracing.close()                       # ends the spans of runs still going

A span per run (parented to the trace context the run was started under: the `traceparent`
header of `POST /v1/runs`, recorded in its RunStarted) and a child span per attempt, with the
step, attempt, executor and outcome; attempts on a model executor also carry the GenAI
semantic-convention attributes (gen_ai.request.model, gen_ai.usage.input_tokens and
output_tokens) and the cost. Retries, transitions, signals and limits are span events on the
run span. A run taken up after a restart (by this or another process) gets a new run span in
the same trace, read from its RunStarted: every part of a run lands in one trace.

The spans are built from the events the engine commits (its `feed.listeners`), so they carry
only what the log holds: never inputs, outputs or payloads; error messages as stored (already
scrubbed of the executors' declared secrets). `rulebound serve` turns this on when
RULEBOUND_OTEL=1, with the global tracer provider (configure its exporter as usual).

Nothing else in rulebound imports this module: without the extra, nothing changes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer, TracerProvider
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from rulebound.domain import events as ev
from rulebound.domain.state import RunState
from rulebound.engine import Engine

__all__ = ["RunTracer", "instrument"]

log = logging.getLogger("rulebound.otel")
_PROPAGATOR = TraceContextTextMapPropagator()
_RESULTS = ("AttemptSucceeded", "AttemptFailed", "AttemptAbandoned")
_OUTCOME = {"AttemptSucceeded": "succeeded", "AttemptFailed": "failed",
            "AttemptAbandoned": "abandoned"}


def _ns(at: datetime) -> int:
    return int(at.timestamp() * 1_000_000_000)


def _parent(traceparent: str | None) -> Context | None:
    return _PROPAGATOR.extract({"traceparent": traceparent}) if traceparent else None


class _Run:
    __slots__ = ("attempts", "span", "workflow")

    def __init__(self, span: Span, workflow: str) -> None:
        self.span, self.workflow = span, workflow
        self.attempts: dict[tuple[str, int], Span] = {}


class RunTracer:
    """Turns committed events into spans. Attach with `instrument(engine)`."""

    def __init__(self, engine: Engine, tracer_provider: TracerProvider | None = None) -> None:
        self.engine = engine
        self.tracer: Tracer = trace.get_tracer("rulebound", tracer_provider=tracer_provider)
        self.runs: dict[UUID, _Run] = {}
        self._pending: dict[UUID, list[Sequence[ev.Event]]] = {}  # runs being looked up
        self._tasks: set[asyncio.Task[None]] = set()

    # --- the listener ------------------------------------------------------------------

    def __call__(self, run_id: UUID, state: RunState, events: Sequence[ev.Event]) -> None:
        try:
            if run_id in self._pending:
                self._pending[run_id].append(events)
                return
            if run_id not in self.runs and not isinstance(events[0], ev.RunStarted):
                # a run started elsewhere (before a restart): find its trace context first
                self._pending[run_id] = [events]
                task = asyncio.get_running_loop().create_task(self._take_up(run_id))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
                return
            self._record(run_id, state, events)
        except Exception:  # tracing never breaks a run
            log.exception("tracing run %s failed", run_id)

    async def _take_up(self, run_id: UUID) -> None:
        try:
            first = (await self.engine.events(run_id))[:1]
        except Exception as exc:
            log.warning("tracing run %s: cannot read its start (%s)", run_id,
                        type(exc).__name__)
            first = []
        started = first[0] if first and isinstance(first[0], ev.RunStarted) else None
        batches = self._pending.pop(run_id, [])
        at = batches[0][0].at if batches else datetime.now().astimezone()
        span = self.tracer.start_span(
            f"run {started.workflow if started else ''}".strip(), kind=SpanKind.INTERNAL,
            context=_parent(started.traceparent if started else None), start_time=_ns(at),
            attributes={"rulebound.run_id": str(run_id), "rulebound.resumed": True,
                        "rulebound.workflow": started.workflow if started else "",
                        "rulebound.worker": self.engine.worker})
        self.runs[run_id] = _Run(span, started.workflow if started else "")
        view_state = None
        for batch in batches:
            self._record(run_id, view_state, batch)

    def _record(self, run_id: UUID, state: RunState | None,
                events: Sequence[ev.Event]) -> None:
        run = self.runs.get(run_id)
        for event in events:
            if isinstance(event, ev.RunStarted):
                run = self._start(run_id, event)
                continue
            if run is None:
                continue
            kind = event.type
            if isinstance(event, ev.AttemptStarted):
                self._attempt_started(run_id, run, event)
            elif kind in _RESULTS:
                self._attempt_ended(run_id, run, event)
            elif isinstance(event, ev.StepScheduled) and event.attempt > 1:
                run.span.add_event("retry scheduled", timestamp=_ns(event.at), attributes={
                    "rulebound.step": event.step, "rulebound.attempt": event.attempt,
                    "rulebound.reason": event.reason})
            elif isinstance(event, ev.TransitionTaken):
                run.span.add_event("transition", timestamp=_ns(event.at), attributes={
                    "rulebound.from": event.from_step, "rulebound.to": event.to_step,
                    "rulebound.condition": event.condition})
            elif isinstance(event, ev.SignalReceived):  # the name; never the payload
                run.span.add_event("signal", timestamp=_ns(event.at),
                                   attributes={"rulebound.signal": event.name})
            elif isinstance(event, ev.LimitReached):
                run.span.add_event("limit reached", timestamp=_ns(event.at), attributes={
                    "rulebound.limit": event.limit, "rulebound.limit_value": event.limit_value,
                    "rulebound.used": event.used})
            elif isinstance(event, ev.RunCompleted | ev.RunFailed | ev.RunCancelled):
                self._end_run(run_id, run, event, state)
                run = None

    # --- spans -------------------------------------------------------------------------

    def _start(self, run_id: UUID, event: ev.RunStarted) -> _Run:
        span = self.tracer.start_span(
            f"run {event.workflow}", kind=SpanKind.INTERNAL, context=_parent(event.traceparent),
            start_time=_ns(event.at),
            attributes={"rulebound.run_id": str(run_id), "rulebound.workflow": event.workflow,
                        "rulebound.definition_hash": event.definition_hash,
                        "rulebound.worker": self.engine.worker})
        run = self.runs[run_id] = _Run(span, event.workflow)
        return run

    def _attempt_started(self, run_id: UUID, run: _Run, event: ev.AttemptStarted) -> None:
        attributes: dict[str, Any] = {
            "rulebound.run_id": str(run_id), "rulebound.step": event.step,
            "rulebound.attempt": event.attempt, "rulebound.executor": event.executor}
        model = self._model(run, event.step, event.executor)
        name = f"{event.step} #{event.attempt}"
        if model is not None:
            attributes.update(model)
            name = f"chat {model['gen_ai.request.model']}"
        span = self.tracer.start_span(name, context=trace.set_span_in_context(run.span),
                                      kind=SpanKind.CLIENT if model else SpanKind.INTERNAL,
                                      start_time=_ns(event.at), attributes=attributes)
        run.attempts[(event.step, event.attempt)] = span

    def _attempt_ended(self, run_id: UUID, run: _Run, event: Any) -> None:
        span = run.attempts.pop((event.step, event.attempt), None)
        if span is None:  # started before a restart: a span for what is known of it
            latency = getattr(event, "latency", 0.0)
            span = self.tracer.start_span(
                f"{event.step} #{event.attempt}", context=trace.set_span_in_context(run.span),
                start_time=_ns(event.at - timedelta(seconds=latency)),
                attributes={"rulebound.run_id": str(run_id), "rulebound.step": event.step,
                            "rulebound.attempt": event.attempt})
        span.set_attribute("rulebound.outcome", _OUTCOME[event.type])
        usage = getattr(event, "usage", None)
        if usage is not None:
            span.set_attribute("gen_ai.usage.input_tokens", usage.tokens_in)
            span.set_attribute("gen_ai.usage.output_tokens", usage.tokens_out)
            span.set_attribute("rulebound.cost_usd", usage.cost)
            span.set_attribute("rulebound.latency_s", event.latency)
        if isinstance(event, ev.AttemptFailed):
            span.set_attribute("error.type", event.error_type)
            span.set_attribute("rulebound.retryable", event.retryable)
            span.set_status(Status(StatusCode.ERROR, event.message))
        elif isinstance(event, ev.AttemptAbandoned):
            span.set_attribute("rulebound.why", event.why)
        span.end(end_time=_ns(event.at))

    def _end_run(self, run_id: UUID, run: _Run, event: Any, state: RunState | None) -> None:
        status = {"RunCompleted": "completed", "RunFailed": "failed",
                  "RunCancelled": "cancelled"}[event.type]
        span = run.span
        span.set_attribute("rulebound.status", status)
        span.set_attribute("rulebound.reason", event.reason)
        if state is not None:
            span.set_attribute("rulebound.cost_usd", state.cost)
            span.set_attribute("gen_ai.usage.input_tokens", state.tokens_in)
            span.set_attribute("gen_ai.usage.output_tokens", state.tokens_out)
            span.set_attribute("rulebound.attempts", state.attempts)
            span.set_attribute("rulebound.retries", state.retries)
        if status == "failed":
            span.set_status(Status(StatusCode.ERROR, event.reason))
        for attempt in run.attempts.values():  # cut off by the end (a cancel, a deadline)
            attempt.set_attribute("rulebound.outcome", "cut_off")
            attempt.end(end_time=_ns(event.at))
        span.end(end_time=_ns(event.at))
        self.runs.pop(run_id, None)

    def _model(self, run: _Run, step: str, executor_name: str) -> dict[str, Any] | None:
        """GenAI attributes when the attempt is a model call (an executor that spends tokens);
        the model is the step's `config["model"]`, else the executor's own."""
        executor = self.engine.registry.executors.get(executor_name)
        if executor is None or not getattr(executor, "spends_tokens", False):
            return None
        model = getattr(executor, "model", None)
        try:
            definition = self.engine.registry.latest(run.workflow)
            config = definition.task(step.split("[")[0]).config or {}
            model = config.get("model", model)
        except Exception:
            pass
        out: dict[str, Any] = {"gen_ai.operation.name": "chat",
                               "gen_ai.request.model": str(model or executor_name)}
        provider = type(executor).__name__.lower()
        for name in ("openai", "anthropic"):
            if name in provider:
                out["gen_ai.provider.name"] = name
        return out

    # --- lifecycle ---------------------------------------------------------------------

    def close(self) -> None:
        """Detach, and end the spans of runs still going (they carry on in a later trace
        part, after a restart)."""
        if self in self.engine.feed.listeners:
            self.engine.feed.listeners.remove(self)
        for task in self._tasks:
            task.cancel()
        for run in self.runs.values():
            for attempt in run.attempts.values():
                attempt.set_attribute("rulebound.outcome", "engine_stopped")
                attempt.end()
            run.span.set_attribute("rulebound.status", "running")
            run.span.end()
        self.runs.clear()


def instrument(engine: Engine, tracer_provider: TracerProvider | None = None) -> RunTracer:
    """Trace `engine`'s runs (the global tracer provider unless one is given)."""
    tracer = RunTracer(engine, tracer_provider)
    engine.feed.listeners.append(tracer)
    return tracer
