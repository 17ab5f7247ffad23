"""A synchronous, clock-free stand-in for the engine: drive a run through the real decider.

Property tests (ours and our users') use it to feed a definition arbitrary executor outcomes,
signals, timer firings, cancellations and crashes, and to check the invariants after every
step. It appends exactly what the engine appends, in the same order, so its histories replay
and re-decide like real ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from . import events as ev
from .decider import advance, dispatchable, timers
from .definitions import Workflow
from .state import RunState, evolve

EPOCH = datetime(2026, 1, 1, tzinfo=UTC)


@dataclass
class Simulator:
    """One run of `definition`. `history` holds every appended event in order."""

    definition: Workflow
    seed: int = 0
    now: datetime = EPOCH
    state: RunState = field(default_factory=RunState)
    history: list[ev.Event] = field(default_factory=list)
    worker: str = "sim"

    # --- appending ----------------------------------------------------------------------

    def _commit(self, *triggers: ev.Event) -> list[ev.Event]:
        """Append facts, then the decisions they call for (one atomic batch, as the engine)."""
        state = self.state
        for event in triggers:
            state = evolve(state, event)
        decided, state = advance(self.definition, state, self.now)
        self.state = state
        self.history.extend(triggers)
        self.history.extend(decided)
        return [*triggers, *decided]

    def start(self, input: Any = None, idempotency_key: str | None = None) -> list[ev.Event]:
        wf = self.definition
        return self._commit(ev.RunStarted(
            at=self.now, workflow=wf.name, definition_hash=wf.hash, input=input,
            limits=wf.limits.model_dump(), idempotency_key=idempotency_key, seed=self.seed))

    def start_attempt(self, key: str) -> list[ev.Event]:
        st = self.state.steps[key]
        task = self.definition.task(st.name)
        return self._commit(ev.AttemptStarted(
            at=self.now, step=key, attempt=st.attempt, executor=task.executor,
            worker=self.worker, deadline=self.now + timedelta(seconds=task.timeout)))

    def succeed(self, key: str, output: Any, usage: ev.Usage = ev.NO_USAGE) -> list[ev.Event]:
        st = self.state.steps[key]
        return self._commit(ev.AttemptSucceeded(
            at=self.now, step=key, attempt=st.attempt, output=output, usage=usage))

    def fail(self, key: str, error_type: str = "server_error", *, retryable: bool = True,
             message: str = "failed", usage: ev.Usage = ev.NO_USAGE,
             retry_after: float | None = None) -> list[ev.Event]:
        st = self.state.steps[key]
        after = self.now + timedelta(seconds=retry_after) if retry_after is not None else None
        return self._commit(ev.AttemptFailed(
            at=self.now, step=key, attempt=st.attempt, error_type=error_type, message=message,
            retryable=retryable, usage=usage, retry_after=after))

    def crash(self) -> list[ev.Event]:
        """What recovery appends after a crash: every started attempt is abandoned."""
        running = [st for st in self.state.steps.values()
                   if st.status == "running" and st.kind == "task"]
        if not running or self.state.terminal:
            return []  # nothing was in flight: recovery has nothing to record
        return self._commit(*(ev.AttemptAbandoned(at=self.now, step=st.key, attempt=st.attempt,
                                                  why="engine restarted") for st in running))

    def signal(self, name: str, payload: Any = None) -> list[ev.Event]:
        return self._commit(ev.SignalReceived(at=self.now, name=name, payload=payload))

    def cancel(self, reason: str = "cancelled") -> list[ev.Event]:
        return self._commit(ev.CancelRequested(at=self.now, reason=reason))

    def advance_time(self, seconds: float) -> list[ev.Event]:
        """Let time pass and fire the decider's timers that came due, as the engine does."""
        self.now += timedelta(seconds=seconds)
        appended: list[ev.Event] = []
        for when, name in timers(self.definition, self.state):
            if when <= self.now and not self.state.terminal:
                appended += self._commit(ev.TimerFired(at=self.now, timer=name))
        return appended

    # --- helpers for drivers -----------------------------------------------------------

    def ready(self) -> list[str]:
        """Scheduled attempts whose not-before time has come."""
        return [st.key for st in dispatchable(self.state)
                if st.not_before is None or st.not_before <= self.now]

    def running(self) -> list[str]:
        return [st.key for st in self.state.steps.values()
                if st.status == "running" and st.kind == "task"]

    def run_to_end(self, outputs: dict[str, Any] | None = None, max_rounds: int = 10_000) -> None:
        """Complete every attempt with `outputs[step name]` (or {}) until nothing is left."""
        outputs = outputs or {}
        for _ in range(max_rounds):
            if self.state.terminal:
                return
            ready = self.ready()
            if ready:
                for key in ready:
                    self.start_attempt(key)
                continue
            running = self.running()
            if running:
                for key in running:
                    self.succeed(key, outputs.get(self.state.steps[key].name, {}))
                continue
            due = [st.not_before for st in dispatchable(self.state) if st.not_before]
            due += [when for when, _ in timers(self.definition, self.state)]
            if not due:
                return
            self.advance_time(max(0.0, (min(due) - self.now).total_seconds()) + 0.001)
