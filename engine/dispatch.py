"""Dispatch: dispatch slots, rate limits, and calling an executor for one attempt.

`claim` takes a slot (and rate-limit room) for every attempt that is due, as AttemptStarted
events that go into the same write as the decisions; `call` runs the executor under the
attempt's deadline and turns whatever happens into the attempt's result event. Nothing here
writes to the store.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

from pydantic import BaseModel, ValidationError
from rulebound.domain import events as ev
from rulebound.domain.decider import dispatchable
from rulebound.domain.definitions import Step
from rulebound.domain.state import RunState, evolve

from . import codec
from .clock import Clock
from .errors import InvalidInput
from .executor import ExecutorError, Result, Task
from .live import LiveRun
from .metrics import EngineMetrics
from .ratelimit import Admission, RateLimit, SlidingWindow

log = logging.getLogger("rulebound.engine")
MESSAGE_LIMIT = 500


@dataclass(slots=True)
class Claim:
    """An attempt claimed for dispatch: its event, and the rate-limit place it holds."""

    event: ev.AttemptStarted
    key: str
    limiter: SlidingWindow | None = None
    admission: Admission | None = None

    def release(self) -> None:
        if self.limiter is not None and self.admission is not None:
            self.limiter.release(self.admission)


class Dispatcher:
    """Slots for attempts executing at once, and the rate limits of executors."""

    def __init__(self, *, slots: int, clock: Clock, worker: str, metrics: EngineMetrics,
                 wake: Callable[[UUID], bool]) -> None:
        self.capacity = slots
        self.free = slots
        self.worker = worker
        self._clock = clock
        self._metrics = metrics
        self._wake = wake  # wake a run that waits for a slot (it may claim one now)
        self.waiting: OrderedDict[UUID, None] = OrderedDict()  # runs waiting for a slot
        self.limiters: dict[str, SlidingWindow] = {}
        self.secrets: tuple[str, ...] = ()  # values no stored message may contain

    def set_rate_limits(self, limits: Mapping[str, RateLimit]) -> None:
        self.limiters = {k: SlidingWindow(v) for k, v in limits.items()}

    # --- slots -------------------------------------------------------------------------

    def rate_limited_due(self, run: LiveRun, state: RunState, now: datetime
                         ) -> list[tuple[str, str, int]]:
        """(step key, executor, tokens) of attempts due now on a rate-limited executor: what
        a limit shared by several engines must admit before `claim` (see Engine)."""
        definition = run.definition
        if state.terminal or definition is None or not self.limiters:
            return []
        due = []
        for st in dispatchable(state):
            if st.not_before is not None and st.not_before > now:
                continue
            executor = definition.task(st.name).executor
            if executor in self.limiters:
                due.append((st.key, executor, st.max_tokens or 0))
        return due

    def claim(self, run: LiveRun, state: RunState, now: datetime,
              refused: dict[str, datetime] | None = None) -> tuple[list[Claim], RunState]:
        """Take dispatch slots (and rate-limit room) for attempts that are due now.

        refused: step keys a shared rate limit refused, with when to try again.
        """
        claimed: list[Claim] = []
        run.admit_at = None
        definition = run.definition
        if state.terminal or definition is None:
            return claimed, state
        for when in (refused or {}).values():
            if run.admit_at is None or when < run.admit_at:
                run.admit_at = when
        for st in dispatchable(state):
            if st.not_before is not None and st.not_before > now:
                continue
            if refused and st.key in refused:
                continue
            if self.free <= 0:
                self.waiting[run.run_id] = None
                break
            step = definition.task(st.name)
            limiter = self.limiters.get(step.executor)
            admission = None
            if limiter is not None:
                wait, admission = limiter.try_acquire(self._clock.monotonic(),
                                                      st.max_tokens or 0)
                if admission is None:  # the timer armed after this commit wakes the run
                    when = now + timedelta(seconds=wait)
                    if run.admit_at is None or when < run.admit_at:
                        run.admit_at = when
                    continue
            self.free -= 1
            deadline = now + _seconds(step.timeout)
            run_deadline = run.deadline_at  # a run's start and deadline never change
            if run_deadline is None:
                assert state.started_at is not None
                run_deadline = run.deadline_at = state.started_at + timedelta(
                    seconds=state.limits["deadline"])
            started = ev.trusted(
                ev.AttemptStarted, at=now, step=st.key, attempt=st.attempt,
                executor=step.executor, worker=self.worker, deadline=min(deadline, run_deadline))
            state = evolve(state, started)
            claimed.append(Claim(started, st.key, limiter, admission))
        return claimed, state

    def unclaim(self, claimed: list[Claim]) -> None:
        """Claims whose write failed: give their slots and rate-limit places back."""
        for claim in claimed:
            claim.release()
            self.release_slot()

    def release_slot(self) -> None:
        self.free += 1
        self.wake_waiting()

    def wake_waiting(self) -> None:
        """Wake as many runs waiting for a dispatch slot as there are free slots.

        A woken run that cannot use its slot after all (its rate limit says wait, or another
        run took it first) queues again; waking one per free slot on every commit, not only
        when a slot is released, means a slot never sits free while runs wait for one.
        """
        woken = 0
        while self.waiting and woken < self.free:
            run_id, _ = self.waiting.popitem(last=False)
            if self._wake(run_id):  # a run no longer here takes no slot from the budget
                woken += 1

    # --- calling the executor -----------------------------------------------------------

    async def call(self, executor: Any, task: Task, claim: Claim
                   ) -> tuple[Any, Exception | None]:
        """Run the executor for one attempt under its deadline: (its result, None) or (None,
        what it raised). Nothing more happens here, so that what turns the outcome into an
        event (`outcome`) can wait for the loop's turn first (see Engine._attempt)."""
        budget = (task.deadline - self._clock.now()).total_seconds()
        if claim.limiter is not None and claim.admission is not None:
            claim.limiter.called(claim.admission, self._clock.monotonic())
        try:
            async with asyncio.timeout(max(0.0, budget)):
                return await executor(task), None
        except Exception as exc:  # a cancellation (BaseException) goes to the caller
            return None, exc

    def outcome(self, step: Step, task: Task, claim: Claim, began: float, result: Any,
                error: Exception | None) -> ev.Event:
        """What `call` came back with, as the attempt's result event."""
        if error is not None:
            return self._failed(step, task, claim, began, error)
        if isinstance(result, Result):
            output, usage = result.output, result.usage
        else:  # a bare output: skip building a Result and a default Usage per attempt
            output, usage = result, ev.NO_USAGE
        if type(usage) is not ev.Usage:  # events below are built unvalidated: check it here
            try:
                usage = ev.Usage.model_validate(usage)
            except ValidationError as exc:
                return self.failure(claim, "error", "executor reported invalid usage: "
                                    + validation_summary(exc), False, began)
        if step.output is not None:
            try:
                output = step.output.model_validate(output).model_dump(mode="json")
            except ValidationError as exc:
                self._check_grant(step, task, usage)
                return self.failure(claim, "invalid_output", validation_summary(exc), True,
                                    began, usage=usage)
        problem = codec.check_json(output)
        if problem is not None:
            # The same output would fail the same way again: not worth a retry.
            self._check_grant(step, task, usage)
            return self.failure(claim, "unstorable_output",
                                f"output cannot be stored: {problem}", False, began,
                                usage=usage)
        self._check_grant(step, task, usage)
        if claim.limiter is not None and claim.admission is not None:
            claim.limiter.settle(claim.admission, usage.tokens)
        return ev.trusted(
            ev.AttemptSucceeded, at=self._clock.now(), step=task.step, attempt=task.attempt,
            output=output, usage=usage, latency=round(self._clock.monotonic() - began, 6))

    def _failed(self, step: Step, task: Task, claim: Claim, began: float,
                error: Exception) -> ev.AttemptFailed:
        """What the executor raised, as AttemptFailed: its deadline, its own report of what
        went wrong (ExecutorError), or anything else (not retried)."""
        if isinstance(error, TimeoutError):
            # Cancelled at the deadline: what the executor reported round by round is all we
            # know of its spend, and it must reach the log (the budget is a fold of facts).
            spent = _spent(task)
            self._check_grant(step, task, spent)
            return self.failure(claim, "timeout", f"no result within {step.timeout:g}s",
                                True, began, usage=spent)
        if isinstance(error, ExecutorError):
            retry_after = (self._clock.now() + timedelta(seconds=error.retry_after)
                           if error.retry_after is not None else None)
            usage = error.usage if error.usage != ev.NO_USAGE else _spent(task)
            self._check_grant(step, task, usage)
            return self.failure(claim, error.kind, error.message, error.retryable, began,
                                usage=usage, retry_after=retry_after)
        return self.failure(claim, "error", short(error), False, began, usage=_spent(task))

    def _check_grant(self, step: Step, task: Task, usage: ev.Usage) -> None:
        """Usage is recorded as reported (the spend happened), but an executor that overruns
        the grant it was told breaks the budget guarantee: make it loud."""
        if (task.max_tokens is not None and usage.tokens_in + usage.tokens_out > task.max_tokens
                ) or (task.max_cost and usage.cost > task.max_cost + 1e-9):
            self._metrics.grant_overruns += 1
            log.warning("executor %r overran its grant on %s attempt %d: %d tokens, $%.6f "
                        "(granted %s tokens, $%s)", step.executor, task.step, task.attempt,
                        usage.tokens, usage.cost, task.max_tokens, task.max_cost)

    def failure(self, claim: Claim, kind: str, message: str, retryable: bool, began: float,
                *, usage: ev.Usage | None = None, retry_after: datetime | None = None
                ) -> ev.AttemptFailed:
        """An AttemptFailed; its message is scrubbed of every configured secret and capped."""
        for secret in self.secrets:
            if secret in message:
                message = message.replace(secret, "***")
        return ev.AttemptFailed(
            at=self._clock.now(), step=claim.key, attempt=claim.event.attempt, error_type=kind,
            message=message[:MESSAGE_LIMIT], retryable=retryable, usage=usage or ev.NO_USAGE,
            latency=round(self._clock.monotonic() - began, 6), retry_after=retry_after)


@functools.lru_cache(maxsize=256)
def _seconds(seconds: float) -> timedelta:
    """A step timeout as a timedelta (a handful of distinct values, asked per attempt)."""
    return timedelta(seconds=seconds)


def _spent(task: Task) -> ev.Usage:
    """The usage an executor reported into `task.spent` before it stopped (see Spend)."""
    spent = task.spent
    if not (spent.tokens_in or spent.tokens_out or spent.cost):
        return ev.NO_USAGE
    return spent.usage


def short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:MESSAGE_LIMIT]


def validation_summary(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(x) for x in err["loc"]) or "value"
        parts.append(f"{loc}: {err['msg']}")
    more = f" (+{exc.error_count() - 5} more)" if exc.error_count() > 5 else ""
    return ("; ".join(parts) + more)[:MESSAGE_LIMIT]


def validate(schema: type[BaseModel] | None, value: Any, what: str) -> Any:
    """`value` checked against `schema` in its JSON form; InvalidInput names what is wrong."""
    if schema is None:
        return value
    try:
        return schema.model_validate(value).model_dump(mode="json")
    except ValidationError as exc:
        raise InvalidInput(f"{what}: {validation_summary(exc)}") from None
