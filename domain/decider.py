"""The decider: every rule of a run lives here, as pure functions.

`decide(definition, state, now)` returns the decisions the recorded facts call for: which step
runs next and why, retries with backoff (jitter from the seed recorded in RunStarted), failure
paths, joins, signal waits and their timeouts, cancellation and every limit. Same definition,
same state, same `now`: same decisions. No clock, no randomness, no I/O.

Each decision names the rule that fired (`reason`, `condition`, `values`), so a run can be
explained from its events alone.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from . import events as ev
from .conditions import MISSING, resolve
from .definitions import END, FAIL, Map, Parallel, Step, WaitForSignal, Workflow
from .events import trusted
from .state import RunState, StepState, evolve
from .wording import counted

_MAX_DECISIONS = 100_000  # a safety net; real batches are a handful of events
# How a re-run of an abandoned attempt's StepScheduled reason begins (explain reads it).
RERUN = "re-run"
# Error kinds that are never retried, whatever the executor said and whatever `Retry.on`
# lists: the same attempt would fail the same way. "unstorable_output": the executor returned
# something the log cannot hold (a set, an integer beyond 64 bits).
PERMANENT_ERRORS = frozenset({"unstorable_output"})
_EPS = 1e-9


def decide(definition: Workflow, state: RunState, now: datetime) -> list[ev.Event]:
    """The decisions the run's recorded facts call for at `now` (possibly none)."""
    return advance(definition, state, now)[0]


def advance(
    definition: Workflow, state: RunState, now: datetime
) -> tuple[list[ev.Event], RunState]:
    """`decide`, plus the state with the decisions folded in (saves the caller a re-fold)."""
    decided: list[ev.Event] = []
    for _ in range(_MAX_DECISIONS):
        batch = _next(definition, state, now)
        if not batch:
            return decided, state
        for event in batch:
            state = evolve(state, event)
            decided.append(event)
    raise RuntimeError("the decider did not converge; this is a bug in rulebound")


# --- the rules, in priority order -------------------------------------------------------


def _next(wf: Workflow, s: RunState, now: datetime) -> list[ev.Event]:
    if s.status != "running":
        return []
    if s.cancel_reason is not None:
        running = [k for k, st in s.steps.items() if st.status == "running" and st.kind == "task"]
        return [ev.RunCancelled(at=now, reason=s.cancel_reason, in_flight=running)]
    assert s.started_at is not None
    if now >= _deadline(s.started_at, s.limits["deadline"]):
        used = (now - s.started_at).total_seconds()
        return [
            ev.LimitReached(at=now, limit="deadline", limit_value=s.limits["deadline"], used=used),
            ev.RunFailed(at=now, error_type="deadline",
                         reason=f"deadline of {s.limits['deadline']:g}s reached"),
        ]
    if not s.steps:
        return _schedule(wf, s, wf.first, now, reason="run started")
    if s.current is not None:
        current = s.steps[s.current]
        if current.status == "completed":
            return _route(wf, s, current, now)
        if current.status == "failed":
            return _route_failure(wf, s, current, now)
    for st in s.steps.values():
        status = st.status
        if status == "completed" or status == "scheduled":
            continue  # the common cases, nothing to decide (checked first: runs per step)
        if status == "succeeded":
            return [trusted(ev.StepCompleted, at=now, step=st.key, visit=st.visit,
                            output=st.output)]
        if status == "attempt_failed":
            return _after_failed_attempt(wf, s, st, now)
        if status == "abandoned":
            return _after_abandoned_attempt(wf, s, st, now)
        if status == "waiting":
            decided = _signal_wait(wf, s, st, now)
            if decided:
                return decided
        if status == "running" and st.kind in ("map", "parallel"):
            decided = _join(wf, s, st, now)
            if decided:
                return decided
    return []


def _deadline(started_at: datetime, seconds: float) -> datetime:
    """A run's deadline. Not memoised: a process-wide cache keyed on each run's start kept
    the last 4,096 runs' datetimes alive after a burst, scattered over the allocator's arenas,
    which then could not be given back (about 0.3 us per decision saved, for memory held
    for good)."""
    return started_at + timedelta(seconds=seconds)


def context(state: RunState, item: Any = MISSING, index: int | None = None) -> dict[str, Any]:
    """What paths resolve against: run input, step outputs, the error, signals, limit."""
    ctx: dict[str, Any] = dict(state.outputs)
    ctx["input"] = state.input
    ctx["error"] = state.last_error
    ctx["signals"] = state.signals
    ctx["limit"] = state.limit
    if item is not MISSING:
        ctx["item"] = item
        ctx["index"] = index
    return ctx


def _route(wf: Workflow, s: RunState, st: StepState, now: datetime) -> list[ev.Event]:
    step = wf.step(st.name)
    target, condition, values = step.next, "next", {}
    if step.routes:  # a plain `next` needs no context (the common case, once per step)
        condition = "otherwise"
        ctx = context(s)
        for route in step.routes:
            reads: dict[str, Any] = {}
            if route.when.evaluate(ctx, reads):
                target, condition, values = route.to, str(route.when), reads
                break
            values.update(reads)  # an "otherwise" shows what the failed conditions read
        values = _jsonable(values)
    taken = trusted(ev.TransitionTaken, at=now, from_step=st.key, to_step=target,
                    condition=condition, values=values)
    if target == END:
        return [taken, ev.RunCompleted(at=now, output=st.output,
                                       reason=f"step {st.key!r} finished the workflow")]
    if target == FAIL:
        return [taken, ev.RunFailed(at=now, error_type="routed_to_fail",
                                    reason=f"step {st.key!r} routed to fail ({condition})")]
    return [taken, *_schedule(wf, s, target, now, reason=f"{st.key} -> {target}: {condition}")]


def _route_failure(wf: Workflow, s: RunState, st: StepState, now: datetime) -> list[ev.Event]:
    step = wf.step(st.name)
    error = dict(st.error or {})
    target = step.on_failure or wf.on_failure
    label = "on_failure"
    if isinstance(step, WaitForSignal) and error.get("type") == "signal_timeout" and (
        step.on_timeout is not None
    ):
        target, label = step.on_timeout, "on_timeout"
    values = {"error_type": error.get("type"), "message": error.get("message")}
    if target is None or target == FAIL:
        return [ev.RunFailed(at=now, error_type=str(error.get("type", "error")),
                             reason=f"step {st.key!r} failed: {error.get('message')}")]
    taken = ev.TransitionTaken(at=now, from_step=st.key, to_step=target,
                               condition=f"{label} ({error.get('type')})", values=values)
    if target == END:
        return [taken, ev.RunCompleted(at=now, output=None,
                                       reason=f"step {st.key!r} failed and its path ends the run")]
    return [taken, *_schedule(wf, s, target, now, reason=f"{label} of {st.key}")]


def _after_failed_attempt(
    wf: Workflow, s: RunState, st: StepState, now: datetime
) -> list[ev.Event]:
    task = wf.task(st.name)
    error = st.error or {}
    kind = str(error.get("type", "error"))
    policy = task.retry
    retryable = bool(error.get("retryable")) and (policy.on is None or kind in policy.on) and (
        kind not in PERMANENT_ERRORS)
    # Attempts the executor reported on; re-runs of abandoned attempts used no retry. (Runs
    # started before the abandoned rule have st.abandoned == 0: the old arithmetic exactly.)
    reported = st.attempt - st.abandoned
    if retryable and reported < policy.attempts:
        refused = _refused_by_budget(s, task, st, now, f"retry after {kind}")
        if refused:
            return refused
        wait = policy.delay(reported, s.seed, f"{st.key}:{st.visit}")
        not_before = now + timedelta(seconds=wait)
        hint = error.get("retry_after")
        if hint:
            asked = min(datetime.fromisoformat(hint),
                        now + timedelta(seconds=policy.max_retry_after))
            not_before = max(not_before, asked)
        reason = (f"retry {reported + 1}/{policy.attempts} after {kind}"
                  + (" (server asked to wait)" if hint else ""))
        return [ev.StepScheduled(
            at=now, step=st.key, kind="task", visit=st.visit, attempt=st.attempt + 1,
            parent=st.parent, item=st.item, not_before=not_before, reason=reason,
            max_cost=task.cost, max_tokens=task.max_tokens)]
    why = "not retryable" if not retryable else f"{counted(policy.attempts, 'attempt')} used"
    return [ev.StepFailed(at=now, step=st.key, visit=st.visit, error_type=kind,
                          message=f"{error.get('message')} ({why})")]


def _refused_by_budget(s: RunState, task: Step, st: StepState, now: datetime,
                       what: str) -> list[ev.Event]:
    """LimitReached and StepFailed if another attempt of `task` would break a run limit
    (`what` would exceed it), else nothing."""
    blocked = _over_budget(s, task)
    if blocked is None:
        return []
    limit, limit_value, used = blocked
    return [
        ev.LimitReached(at=now, limit=limit, limit_value=limit_value, used=used, step=st.key),
        ev.StepFailed(at=now, step=st.key, visit=st.visit, error_type=f"{limit}_limit",
                      message=f"{what} would exceed the {limit} limit"),
    ]


def _after_abandoned_attempt(
    wf: Workflow, s: RunState, st: StepState, now: datetime
) -> list[ev.Event]:
    """An attempt cut off by an engine stop: not the step's failure. Re-run it at once,
    outside the retry budget and whatever `Retry.on` says, up to the step's cap."""
    task = wf.task(st.name)
    cap = task.retry.max_abandoned
    if cap is None:
        cap = int(s.limits["max_abandoned"])
    why = (st.error or {}).get("message")
    if st.abandoned > cap:
        return [ev.StepFailed(
            at=now, step=st.key, visit=st.visit, error_type="abandoned",
            message=f"attempt {st.attempt} abandoned ({why}); "
                    f"{counted(st.abandoned, 'attempt')} of this visit "
                    f"{'was' if st.abandoned == 1 else 'were'} abandoned, more than "
                    f"max_abandoned={cap}")]
    refused = _refused_by_budget(s, task, st, now,
                                 f"re-running abandoned attempt {st.attempt}")
    if refused:
        return refused
    return [ev.StepScheduled(
        at=now, step=st.key, kind="task", visit=st.visit, attempt=st.attempt + 1,
        parent=st.parent, item=st.item, not_before=now,
        reason=f"{RERUN} {st.abandoned}/{cap} of abandoned attempt {st.attempt} ({why}); "
               "no retry used",
        max_cost=task.cost, max_tokens=task.max_tokens)]


def _signal_wait(wf: Workflow, s: RunState, st: StepState, now: datetime) -> list[ev.Event]:
    step = wf.step(st.name)
    assert isinstance(step, WaitForSignal)
    for name, payload in s.inbox:
        if name == step.signal:
            return [ev.StepCompleted(at=now, step=st.key, visit=st.visit, output=payload,
                                     signal=name)]
    assert st.waiting_since is not None
    if now >= st.waiting_since + timedelta(seconds=step.timeout):
        return [ev.StepFailed(at=now, step=st.key, visit=st.visit, error_type="signal_timeout",
                              message=f"no {step.signal!r} signal within {step.timeout:g}s")]
    return []


def _join(wf: Workflow, s: RunState, st: StepState, now: datetime) -> list[ev.Event]:
    step = wf.step(st.name)
    if isinstance(step, Parallel):
        found = [s.steps.get(b.name) for b in step.branches]
        if st.scheduled_items < len(step.branches):
            return []
        if any(c is None or c.status not in ("completed", "failed") for c in found):
            return []
        branches = [c for c in found if c is not None]
        return _finish_join(st, branches, step.on_branch_failure == "fail",
                            lambda c: c.key, dict, now, "branch")
    assert isinstance(step, Map)
    total = st.items or 0
    keys = [f"{step.step.name}[{i}]" for i in range(st.scheduled_items)]
    children = [s.steps[k] for k in keys]
    failed = any(c.status == "failed" for c in children)
    stopping = st.error is not None or (failed and step.on_item_failure == "fail")
    running = sum(1 for c in children if c.status not in ("completed", "failed"))
    if running == 0 and (stopping or st.scheduled_items == total):
        if st.error is not None:
            return [ev.StepFailed(at=now, step=st.key, visit=st.visit,
                                  error_type=str(st.error["type"]),
                                  message=str(st.error["message"]))]
        return _finish_join(st, children, step.on_item_failure == "fail", lambda c: c.item,
                            lambda pairs: [v for _, v in pairs], now, "item")
    if stopping or st.scheduled_items >= total or running >= step.max_concurrency:
        return []
    # Schedule the next item; the loop in `advance` comes back for more up to the concurrency.
    index = st.scheduled_items
    blocked = _over_budget(s, step.step)
    if blocked is not None:
        limit, limit_value, used = blocked
        return [ev.LimitReached(at=now, limit=limit, limit_value=limit_value, used=used,
                                step=st.key)]
    if s.steps_taken >= s.limits["max_steps"]:
        return [ev.LimitReached(at=now, limit="steps", limit_value=s.limits["max_steps"],
                                used=s.steps_taken, step=st.key)]
    return [ev.StepScheduled(
        at=now, step=f"{step.step.name}[{index}]", kind="task", visit=st.visit, attempt=1,
        parent=st.key, item=index, not_before=_not_before(step.step, now),
        reason=f"item {index + 1} of {total} of {st.key}", max_cost=step.step.cost,
        max_tokens=step.step.max_tokens)]


def _finish_join(
    parent: StepState,
    children: list[StepState],
    fail_on_failure: bool,
    label: Callable[[StepState], Any],
    build: Callable[[list[tuple[Any, Any]]], Any],
    now: datetime,
    noun: str,
) -> list[ev.Event]:
    failures = [c for c in children if c.status == "failed"]
    if failures and fail_on_failure:
        first = failures[0]
        error = first.error or {}
        return [ev.StepFailed(at=now, step=parent.key, visit=parent.visit,
                              error_type=f"{noun}_failed",
                              message=f"{noun} {first.key!r} failed: {error.get('message')}")]
    pairs = [(label(c), c.output if c.status == "completed" else {"error": dict(c.error or {})})
             for c in children]
    return [ev.StepCompleted(at=now, step=parent.key, visit=parent.visit, output=build(pairs))]


# --- scheduling and limits ---------------------------------------------------------------


def _over_budget(s: RunState, task: Step, copies: int = 1) -> tuple[Any, float, float] | None:
    """The limit that `copies` more worst-case attempts of `task` would break, if any."""
    cost_left = s.limits["max_cost"] - s.cost - s.reserved_cost
    if task.cost * copies > cost_left + _EPS:
        return "cost", s.limits["max_cost"], s.cost + s.reserved_cost
    if task.max_tokens is not None:
        tokens_left = s.limits["max_tokens"] - s.tokens - s.reserved_tokens
        if task.max_tokens * copies > tokens_left:
            return "tokens", s.limits["max_tokens"], s.tokens + s.reserved_tokens
    return None


def _not_before(step: Step, now: datetime) -> datetime:
    return now + timedelta(seconds=step.delay) if step.delay else now


def _schedule(
    wf: Workflow, s: RunState, target: str, now: datetime, *, reason: str,
    limit_path: bool = False,
) -> list[ev.Event]:
    """Start a new visit of top-level step `target`, or record the limit that forbids it."""
    step = wf.step(target)
    visit = s.visits.get(target, 0) + 1
    blocked: tuple[Any, float, float] | None = None
    # wf.max_visits(target) without looking the step up again (this runs once per step).
    max_visits = step.max_visits if step.max_visits is not None else 1
    if visit > max_visits:
        blocked = ("visits", max_visits, visit - 1)
    elif s.steps_taken + _units(step) > s.limits["max_steps"]:
        blocked = ("steps", s.limits["max_steps"], s.steps_taken)
    elif isinstance(step, Step):
        blocked = _over_budget(s, step)
    elif isinstance(step, Parallel):
        blocked = _over_budget_all(s, step.branches)
    elif isinstance(step, Map):
        items = resolve(step.over, context(s))
        if isinstance(items, list) and items:
            blocked = _over_budget(s, step.step, copies=len(items))
    if blocked is not None:
        limit, limit_value, used = blocked
        reached = ev.LimitReached(at=now, limit=limit, limit_value=limit_value, used=used,
                                  step=target)
        if wf.on_limit is not None and not limit_path and s.limit is None:
            taken = ev.TransitionTaken(
                at=now, from_step=target, to_step=wf.on_limit,
                condition=f"{limit} limit reached", values={"limit": limit, "used": used,
                                                            "limit_value": limit_value})
            # The limit path is tried once; if it cannot fit either, the run fails.
            after = _schedule(wf, _with_limit(s, reached), wf.on_limit, now,
                              reason=f"on_limit ({limit})", limit_path=True)
            return [reached, taken, *after]
        return [reached, ev.RunFailed(
            at=now, error_type=f"{limit}_limit",
            reason=f"{limit} limit reached before step {target!r} "
                   f"(limit {limit_value:g}, used {used:g})")]
    if isinstance(step, Step):
        return [trusted(
            ev.StepScheduled, at=now, step=target, kind="task", visit=visit, attempt=1,
            not_before=_not_before(step, now), reason=reason, max_cost=step.cost,
            max_tokens=step.max_tokens)]
    if isinstance(step, WaitForSignal):
        return [ev.StepScheduled(at=now, step=target, kind="signal", visit=visit, attempt=1,
                                 not_before=now, reason=reason, max_cost=0.0)]
    if isinstance(step, Parallel):
        scheduled: list[ev.Event] = [ev.StepScheduled(
            at=now, step=target, kind="parallel", visit=visit, attempt=1, not_before=now,
            reason=reason, max_cost=0.0, items=len(step.branches))]
        for branch in step.branches:
            scheduled.append(ev.StepScheduled(
                at=now, step=branch.name, kind="task", visit=visit, attempt=1, parent=target,
                not_before=_not_before(branch, now), reason=f"branch of {target}",
                max_cost=branch.cost, max_tokens=branch.max_tokens))
        return scheduled
    assert isinstance(step, Map)
    items = resolve(step.over, context(s))
    parent = ev.StepScheduled(at=now, step=target, kind="map", visit=visit, attempt=1,
                              not_before=now, reason=reason, max_cost=0.0,
                              items=len(items) if isinstance(items, list) else 0)
    if not isinstance(items, list):
        found = "missing" if items is MISSING else type(items).__name__
        return [parent, ev.StepFailed(
            at=now, step=target, visit=visit, error_type="invalid_input",
            message=f"{step.over!r} is {found}, not a list")]
    if len(items) > step.max_items:
        return [parent, ev.StepFailed(
            at=now, step=target, visit=visit, error_type="too_many_items",
            message=f"{len(items)} items, more than max_items={step.max_items}")]
    return [parent]


def _units(step: Any) -> int:
    if isinstance(step, Parallel):
        return len(step.branches)
    return 1  # a map's items are counted as they are scheduled


def _over_budget_all(s: RunState, tasks: tuple[Step, ...]) -> tuple[Any, float, float] | None:
    cost = sum(t.cost for t in tasks)
    if cost > s.limits["max_cost"] - s.cost - s.reserved_cost + _EPS:
        return "cost", s.limits["max_cost"], s.cost + s.reserved_cost
    tokens = sum(t.max_tokens or 0 for t in tasks)
    if tokens > s.limits["max_tokens"] - s.tokens - s.reserved_tokens:
        return "tokens", s.limits["max_tokens"], s.tokens + s.reserved_tokens
    return None


def _with_limit(s: RunState, reached: ev.LimitReached) -> RunState:
    return evolve(s, reached)


def _jsonable(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items()}


# --- what the engine needs to know about time ----------------------------------------------


def build_input(definition: Workflow, state: RunState, key: str) -> Any:
    """The task input of step key `key`, built from the run input and earlier outputs."""
    st = state.steps[key]
    task = definition.task(st.name)
    spec = task.input
    if spec is None and st.item is None:
        return state.input  # the common case, without building the whole context
    if st.parent is not None and st.item is not None:
        parent = definition.step(st.parent)
        assert isinstance(parent, Map)
        items = resolve(parent.over, context(state))
        ctx = context(state, item=items[st.item], index=st.item)
    else:
        ctx = context(state)
    if spec is None:
        return ctx.get("item", state.input)
    if isinstance(spec, str):
        value = resolve(spec, ctx)
        return None if value is MISSING else value
    built = {}
    for name, path in spec.items():
        value = resolve(path, ctx)
        built[name] = None if value is MISSING else value
    return built


def timers(definition: Workflow, state: RunState) -> list[tuple[datetime, str]]:
    """When the decider has something to decide without any new fact: (time, timer name).

    The engine sleeps until the earliest, appends `TimerFired(timer)` and decides again.
    Attempts waiting for their not-before time are the engine's to dispatch, not listed here.
    """
    if state.status != "running" or state.started_at is None:
        return []
    due = [(state.started_at + timedelta(seconds=state.limits["deadline"]), "deadline")]
    for st in state.steps.values():
        if st.status == "waiting" and st.waiting_since is not None:
            step = definition.step(st.name)
            assert isinstance(step, WaitForSignal)
            due.append((st.waiting_since + timedelta(seconds=step.timeout), f"signal:{st.key}"))
    return sorted(due)


def dispatchable(state: RunState) -> list[StepState]:
    """Attempts that are scheduled and not yet started (the engine starts them when due)."""
    if state.status != "running":
        return []
    return [st for st in state.steps.values() if st.status == "scheduled"]
