"""Timers: wake each live run at its next due moment.

The moments are a run's deadline, its scheduled attempts' not-before times, its signal
waits' timeouts and the moment a rate limit admits it again. One loop timer per run, armed
after every commit; when it fires, the engine commits with no new fact (TimerFired).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Container
from datetime import datetime, timedelta
from uuid import UUID

from rulebound.domain.definitions import WaitForSignal

from .clock import Clock
from .live import LiveRun


class Timers:
    def __init__(self, clock: Clock, on_due: Callable[[LiveRun], None],
                 waiting_for_slot: Container[UUID]) -> None:
        self._clock = clock
        self._on_due = on_due
        self._waiting_for_slot = waiting_for_slot
        self.stopped = False

    def arm(self, run: LiveRun, at: datetime | None = None, *,
            now: datetime | None = None) -> None:
        """Wake the run at its next due time, or at `at` if that is sooner."""
        state = run.state
        if run.definition is None or state.terminal or self.stopped:
            return
        # The same moments as the decider's `timers()` plus the attempts' not-before times,
        # in one pass over the steps: this runs after every commit. While the run waits for
        # a dispatch slot (a freed slot wakes it) or for its rate limit (`admit_at`), an
        # attempt that is already due is left out: a timer for its past not-before time would
        # wake the run in a busy loop.
        due = run.deadline_at
        if due is None:
            if state.started_at is None:
                return
            due = run.deadline_at = state.started_at + timedelta(
                seconds=state.limits["deadline"])
        if now is None:
            now = self._clock.now()
        blocked = run.admit_at is not None or run.run_id in self._waiting_for_slot
        if run.admit_at is not None and run.admit_at < due:
            due = run.admit_at
        for st in state.steps.values():
            status = st.status
            if status == "scheduled":
                if st.not_before is not None and st.not_before < due and (
                        not blocked or st.not_before > now):
                    due = st.not_before
            elif status == "waiting" and st.waiting_since is not None:
                step = run.definition.step(st.name)
                assert isinstance(step, WaitForSignal)
                when = st.waiting_since + timedelta(seconds=step.timeout)
                if when < due:
                    due = when
        if at is not None and at < due:
            due = at
        if run.timer is not None:
            if due == run.timer_at:
                return  # already armed for that moment
            run.timer.cancel()
        run.timer_at = due
        delay = max(0.0, (due - now).total_seconds())
        run.timer = asyncio.get_running_loop().call_later(delay, self._fire, run)

    def retry_soon(self, run: LiveRun, seconds: float = 1.0) -> None:
        """Wake the run again shortly: something it needs (the store) failed just now."""
        self.arm(run, self._clock.now() + timedelta(seconds=seconds))

    def cancel(self, run: LiveRun) -> None:
        if run.timer is not None:
            run.timer.cancel()
            run.timer = None
            run.timer_at = None

    def _fire(self, run: LiveRun) -> None:
        run.timer = None
        run.timer_at = None
        if not self.stopped:
            self._on_due(run)
