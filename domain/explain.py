"""Explain a run from its events alone: what happened, why, what it cost, where time went.

Pure: an auditor with an exported log (and optionally the definition) gets the same text
as the engine that ran it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from . import events as ev
from .decider import RERUN
from .definitions import Workflow
from .wording import counted as counted  # where the CLI and demo import it from


@dataclass
class _StepStats:
    attempts: int = 0
    retries: int = 0
    cost: float = 0.0
    tokens: int = 0
    executing: float = 0.0
    waiting: float = 0.0  # backoff, rate limits, queueing: scheduled -> started
    signal_wait: float = 0.0
    grant: float = 0.0  # the worst case of the attempt last scheduled


def _short(value: Any, limit: int = 80) -> str:
    text = json.dumps(value, default=str, ensure_ascii=False, sort_keys=True)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def explain(events: Sequence[ev.Event], definition: Workflow | None = None,
            *, run_id: str | None = None) -> str:
    """A readable account of the run, one line per decision or result, then the totals."""
    if not events or not isinstance(events[0], ev.RunStarted):
        return "no run: the log does not start with RunStarted\n"
    head = events[0]
    t0 = head.at

    def rel(at: datetime) -> str:
        return f"+{(at - t0).total_seconds():.3f}s"

    lines = [
        f"Run {run_id or '?'} of workflow {head.workflow!r} "
        f"(definition {head.definition_hash[:12]}), started {head.at.isoformat()}",
        f"  input: {_short(head.input, 160)}",
        "  limits: " + ", ".join(f"{k}={v}" for k, v in head.limits.items()),
    ]
    if definition is not None and definition.hash != head.definition_hash:
        lines.append(f"  NOTE: the definition given has hash {definition.hash[:12]}, "
                     "not the one this run started on")
    lines.append("")
    stats: dict[str, _StepStats] = {}
    scheduled_at: dict[str, datetime] = {}
    started_at: dict[str, datetime] = {}
    limits: list[str] = []
    for seq, event in enumerate(events, start=1):
        text = _line(event, scheduled_at, started_at, stats, limits, rel)
        if text:
            lines.append(f"{seq:>5} {rel(event.at):>11}  {text}")
    last = events[-1]
    lines.append("")
    outcome = {
        "RunCompleted": "completed", "RunFailed": "failed", "RunCancelled": "cancelled",
    }.get(last.type, "still running")
    total = (last.at - t0).total_seconds()
    lines.append(f"Outcome: {outcome} after {total:.3f}s")
    if isinstance(last, ev.RunCompleted):
        lines.append(f"  output: {_short(last.output, 200)}")
    elif isinstance(last, ev.RunFailed | ev.RunCancelled):
        lines.append(f"  reason: {last.reason}")
    if limits:
        lines.append("  limits reached: " + "; ".join(limits))
    lines.append("")
    header = f"  {'step':<24} {'attempts':>8} {'retries':>7} {'cost $':>10} {'tokens':>8} " \
             f"{'executing s':>11} {'waiting s':>9} {'signal s':>8}"
    lines.append(header)
    totals = _StepStats()
    for key, st in stats.items():
        lines.append(f"  {key:<24} {st.attempts:>8} {st.retries:>7} {st.cost:>10.4f} "
                     f"{st.tokens:>8} {st.executing:>11.3f} {st.waiting:>9.3f} "
                     f"{st.signal_wait:>8.3f}")
        for name in ("attempts", "retries", "cost", "tokens", "executing", "waiting",
                     "signal_wait"):  # grant is per step, not summed
            setattr(totals, name, getattr(totals, name) + getattr(st, name))
    lines.append(f"  {'total':<24} {totals.attempts:>8} {totals.retries:>7} "
                 f"{totals.cost:>10.4f} {totals.tokens:>8} {totals.executing:>11.3f} "
                 f"{totals.waiting:>9.3f} {totals.signal_wait:>8.3f}")
    return "\n".join(lines) + "\n"


def _line(event: ev.Event, scheduled_at: dict[str, datetime], started_at: dict[str, datetime],
          stats: dict[str, _StepStats], limits: list[str], rel: Any) -> str | None:
    match event:
        case ev.RunStarted():
            return "run started"
        case ev.StepScheduled():
            st = stats.setdefault(event.step, _StepStats())
            scheduled_at[event.step] = event.at
            st.grant = event.max_cost
            if event.attempt > 1 and not event.reason.startswith(RERUN):
                st.retries += 1  # a re-run of an abandoned attempt uses no retry
            if event.kind == "signal":
                return f"{event.step}: waiting for a signal ({event.reason})"
            if event.kind in ("parallel", "map"):
                return f"{event.step}: {event.kind} of {event.items} started ({event.reason})"
            when = "" if event.not_before <= event.at else f", not before {rel(event.not_before)}"
            return (f"{event.step}: attempt {event.attempt} scheduled{when} — {event.reason}"
                    f" (budget ${event.max_cost:g}"
                    + (f", {event.max_tokens} tokens" if event.max_tokens else "") + ")")
        case ev.AttemptStarted():
            st = stats.setdefault(event.step, _StepStats())
            st.attempts += 1
            if event.step in scheduled_at:
                st.waiting += (event.at - scheduled_at[event.step]).total_seconds()
            started_at[event.step] = event.at
            return f"{event.step}: attempt {event.attempt} started on {event.executor!r}"
        case ev.AttemptSucceeded() | ev.AttemptFailed():
            st = stats.setdefault(event.step, _StepStats())
            st.cost += event.usage.cost
            st.tokens += event.usage.tokens
            if event.step in started_at:
                st.executing += (event.at - started_at.pop(event.step)).total_seconds()
            usage = f"${event.usage.cost:.4f}, {event.usage.tokens} tokens, {event.latency:.3f}s"
            if isinstance(event, ev.AttemptSucceeded):
                return f"{event.step}: attempt {event.attempt} succeeded ({usage}) -> " \
                       f"{_short(event.output)}"
            kind = "retryable" if event.retryable else "not retryable"
            after = f", server asked to wait until {rel(event.retry_after)}" \
                if event.retry_after else ""
            return (f"{event.step}: attempt {event.attempt} FAILED with {event.error_type} "
                    f"({kind}{after}): {event.message} ({usage})")
        case ev.AttemptAbandoned():
            started_at.pop(event.step, None)
            st = stats.setdefault(event.step, _StepStats())
            st.cost += st.grant  # what it spent is unknown: the budget charges its worst case
            return (f"{event.step}: attempt {event.attempt} abandoned ({event.why}); "
                    f"charged its worst case ${st.grant:g}")
        case ev.StepCompleted():
            if event.signal is not None:
                st = stats.setdefault(event.step, _StepStats())
                if event.step in scheduled_at:
                    st.signal_wait += (event.at - scheduled_at[event.step]).total_seconds()
                return f"{event.step}: signal {event.signal!r} consumed -> {_short(event.output)}"
            return f"{event.step}: completed"
        case ev.StepFailed():
            return f"{event.step}: FAILED ({event.error_type}: {event.message})"
        case ev.TransitionTaken():
            read = ", ".join(f"{k}={_short(v, 40)}" for k, v in event.values.items())
            because = f"because {event.condition}" if event.condition not in (
                "next", "otherwise") else f"({event.condition})"
            return f"transition {event.from_step} -> {event.to_step} {because}" + (
                f" [read {read}]" if read else "")
        case ev.SignalReceived():
            return f"signal {event.name!r} received: {_short(event.payload)}"
        case ev.TimerFired():
            return f"timer {event.timer} fired"
        case ev.LimitReached():
            where = f" at {event.step}" if event.step else ""
            limits.append(f"{event.limit}{where} (limit {event.limit_value:g}, used "
                          f"{event.used:g})")
            return (f"LIMIT {event.limit} reached{where}: limit {event.limit_value:g}, "
                    f"used {event.used:g}")
        case ev.CancelRequested():
            return f"cancel requested: {event.reason}"
        case ev.RunCompleted():
            return f"run completed: {event.reason}"
        case ev.RunFailed():
            return f"run FAILED ({event.error_type}): {event.reason}"
        case ev.RunCancelled():
            inflight = f" (in flight: {', '.join(event.in_flight)})" if event.in_flight else ""
            return f"run cancelled: {event.reason}{inflight}"
    return None
