"""Run state: nothing but the fold of a run's events.

`evolve(state, event)` returns a new state and never mutates its argument, so any prefix of a
history can be kept and compared. States are frozen dataclasses (cheap to copy, unlike
validated models) and serialise to canonical JSON for byte-equal comparisons in tests.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields
from datetime import datetime
from typing import Any, TypeVar

from . import events as ev
from .errors import InvalidEvent

TERMINAL = frozenset({"completed", "failed", "cancelled"})
_T = TypeVar("_T")


def replace(obj: _T, **changes: Any) -> _T:
    """A changed copy of a frozen state object.

    dataclasses.replace re-runs __init__ over every field (~35 here) for each event; copying
    the instance dict is several times cheaper, and evolve runs once per event on every fold.
    """
    new = object.__new__(type(obj))
    values = obj.__dict__.copy()
    values.update(changes)
    object.__setattr__(new, "__dict__", values)
    return new


@dataclass(frozen=True)
class StepState:
    """One step key's latest visit. Keys are step names, or `name[i]` for map items.

    status: scheduled -> running -> succeeded | attempt_failed | abandoned (awaiting a
            decision) -> completed | failed; signal steps wait in "waiting"; parents run in
            "running". "abandoned": the attempt was cut off by an engine stop (runs whose
            limits carry `max_abandoned`; older runs record it as an attempt_failed).
    abandoned: how many attempts of this visit were abandoned so far (under the
      `max_abandoned` rule; they use none of the step's retries).
    """

    key: str
    name: str
    kind: str
    status: str
    visit: int
    attempt: int
    reason: str = ""
    parent: str | None = None
    item: int | None = None
    items: int | None = None
    scheduled_items: int = 0
    not_before: datetime | None = None
    max_cost: float = 0.0
    max_tokens: int | None = None
    deadline: datetime | None = None
    executor: str | None = None
    output: Any = None
    error: Mapping[str, Any] | None = None
    waiting_since: datetime | None = None
    abandoned: int = 0


@dataclass(frozen=True)
class RunState:
    version: int = 0
    status: str = "new"
    workflow: str = ""
    definition_hash: str = ""
    input: Any = None
    limits: Mapping[str, Any] = field(default_factory=dict)
    seed: int = 0
    idempotency_key: str | None = None
    started_at: datetime | None = None
    updated_at: datetime | None = None
    steps: Mapping[str, StepState] = field(default_factory=dict)
    current: str | None = None
    visits: Mapping[str, int] = field(default_factory=dict)
    outputs: Mapping[str, Any] = field(default_factory=dict)
    last_error: Mapping[str, Any] | None = None
    inbox: tuple[tuple[str, Any], ...] = ()
    signals: Mapping[str, Any] = field(default_factory=dict)
    signal_ids: Mapping[str, str] = field(default_factory=dict)  # sender's id -> signal name
    cost: float = 0.0
    tokens_in: int = 0
    tokens_out: int = 0
    reserved_cost: float = 0.0
    reserved_tokens: int = 0
    steps_taken: int = 0
    attempts: int = 0
    retries: int = 0
    limit: Mapping[str, Any] | None = None
    cancel_reason: str | None = None
    output: Any = None
    error_type: str | None = None
    reason: str | None = None

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    @property
    def tokens(self) -> int:
        return self.tokens_in + self.tokens_out

    @property
    def reruns_abandoned(self) -> bool:
        """Whether abandoned attempts are re-run outside the retry budget (`max_abandoned`
        recorded in RunStarted); runs started before that rule retry them as failures."""
        return "max_abandoned" in self.limits

    def to_dict(self) -> dict[str, Any]:
        """Plain data for canonical JSON (datetimes as ISO strings).

        A step's `abandoned` count is left out while it is 0, and `signal_ids` while empty,
        so the state of every run that never used them serialises exactly as before they
        existed.
        """
        data = _plain(asdict(self))
        if not data["signal_ids"]:
            del data["signal_ids"]
        for step in data["steps"].values():
            if not step["abandoned"]:
                del step["abandoned"]
        return data


    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunState:
        """The state `to_dict()` describes: `RunState.from_dict(s.to_dict()) == s`, also
        through JSON, for every state a fold of decoded events reaches (their values are
        JSON data). Raises ValueError for data that does not describe a state."""
        try:
            values = {name: data[name] for name in _RUN_FIELDS if name in data}
            unknown = set(data) - set(_RUN_FIELDS)
            if unknown:
                raise ValueError(f"unknown fields {sorted(unknown)}")
            for name in ("started_at", "updated_at"):
                values[name] = _when(values.get(name))
            for name in ("limits", "visits", "outputs", "signals", "signal_ids"):
                if name in values:
                    values[name] = dict(values[name])
            values["inbox"] = tuple((str(n), p) for n, p in values.get("inbox", ()))
            values["steps"] = {key: _step_from_dict(step)
                               for key, step in dict(values.get("steps", {})).items()}
            return cls(**values)
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"not a run state: {exc}") from None


def _when(value: Any) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


def _step_from_dict(data: Mapping[str, Any]) -> StepState:
    values = dict(data)
    unknown = set(values) - set(_STEP_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown step fields {sorted(unknown)}")
    for name in ("not_before", "deadline", "waiting_since"):
        values[name] = _when(values.get(name))
    return StepState(**values)


_RUN_FIELDS = tuple(f.name for f in fields(RunState))

# Every field in declaration order (required ones as None, always given by the caller).
_STEP_DEFAULTS = {f.name: None if f.default is MISSING else f.default for f in fields(StepState)}
_new = object.__new__
_set_dict = object.__setattr__


def _new_step(**values: Any) -> StepState:
    """A StepState built without its frozen __init__ (20 guarded setattrs per call).

    Same result as `StepState(**values)`: `evolve` builds one per scheduled step, on every
    fold and on the engine's hot path.
    """
    step = _new(StepState)
    data = dict(_STEP_DEFAULTS)
    data.update(values)
    _set_dict(step, "__dict__", data)
    return step


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _expect(state: RunState, key: str, attempt: int | None, statuses: tuple[str, ...],
            event: ev.Event) -> StepState:
    step = state.steps.get(key)
    if step is None or step.status not in statuses or (
        attempt is not None and step.attempt != attempt
    ):
        found = "no such step" if step is None else f"{step.status}, attempt {step.attempt}"
        raise InvalidEvent(f"{event.type} for {key!r} attempt {attempt} does not apply ({found})")
    return step


def _release(state: RunState, step: StepState) -> tuple[float, int]:
    return (max(0.0, state.reserved_cost - step.max_cost),
            max(0, state.reserved_tokens - (step.max_tokens or 0)))


def evolve(state: RunState, event: ev.Event) -> RunState:
    """Fold one event into the run's state. Raises InvalidEvent if it cannot apply."""
    status = state.status
    if status in TERMINAL:
        raise InvalidEvent(f"{event.type} after the run ended ({status})")
    if status == "new" and event.type != "RunStarted":
        raise InvalidEvent(f"{event.type} before RunStarted")
    fold = _FOLDS.get(type(event))
    if fold is None:
        raise InvalidEvent(f"unknown event {type(event).__name__}")
    # `replace` inlined, and the fold writes its changes straight into the new state's field
    # dict (no changes dict to build and merge): this runs once per event on every fold and
    # on the engine's hot path. `values` is a fresh copy, so a fold that raises leaves
    # `state` untouched; folds copy any nested mapping before changing it.
    values = state.__dict__.copy()
    fold(state, event, values)
    values["version"] = state.version + 1
    values["updated_at"] = event.at
    new = _new(RunState)
    _set_dict(new, "__dict__", values)
    return new


def _put(state: RunState, values: dict[str, Any], step: StepState) -> dict[str, StepState]:
    """Store `step` in a copy of the run's steps; returns the copy (for further changes)."""
    steps = dict(state.steps)
    steps[step.key] = step
    values["steps"] = steps
    return steps


def _run_started(state: RunState, event: ev.RunStarted, values: dict[str, Any]) -> None:
    if state.status != "new":
        raise InvalidEvent("RunStarted twice")
    values.update(
        status="running", workflow=event.workflow, definition_hash=event.definition_hash,
        input=event.input, limits=dict(event.limits), seed=event.seed,
        idempotency_key=event.idempotency_key, started_at=event.at)


def _attempt_started(state: RunState, event: ev.AttemptStarted, values: dict[str, Any]
                     ) -> None:
    step = _expect(state, event.step, event.attempt, ("scheduled",), event)
    _put(state, values, replace(step, status="running", deadline=event.deadline,
                                executor=event.executor))
    values["attempts"] = state.attempts + 1


def _spend(state: RunState, step: StepState, usage: ev.Usage, values: dict[str, Any]) -> None:
    """Charge an attempt's usage and release what it had reserved."""
    values["cost"] = state.cost + usage.cost
    values["tokens_in"] = state.tokens_in + usage.tokens_in
    values["tokens_out"] = state.tokens_out + usage.tokens_out
    values["reserved_cost"] = max(0.0, state.reserved_cost - step.max_cost)
    values["reserved_tokens"] = max(0, state.reserved_tokens - (step.max_tokens or 0))


def _attempt_succeeded(state: RunState, event: ev.AttemptSucceeded, values: dict[str, Any]
                       ) -> None:
    step = _expect(state, event.step, event.attempt, ("running",), event)
    _put(state, values, replace(step, status="succeeded", output=event.output, error=None))
    _spend(state, step, event.usage, values)


def _attempt_failed(state: RunState, event: ev.AttemptFailed, values: dict[str, Any]) -> None:
    step = _expect(state, event.step, event.attempt, ("running",), event)
    error = {"step": step.key, "type": event.error_type, "message": event.message,
             "retryable": event.retryable,
             "retry_after": event.retry_after.isoformat() if event.retry_after else None}
    _put(state, values, replace(step, status="attempt_failed", error=error))
    _spend(state, step, event.usage, values)


def _attempt_abandoned(state: RunState, event: ev.AttemptAbandoned, values: dict[str, Any]
                       ) -> None:
    # What an abandoned attempt spent is unknown: charge its worst case (hard budget).
    step = _expect(state, event.step, event.attempt, ("running",), event)
    reserved_cost, reserved_tokens = _release(state, step)
    error = {"step": step.key, "type": "abandoned", "message": event.why,
             "retryable": True, "retry_after": None}
    if state.reruns_abandoned:
        _put(state, values, replace(step, status="abandoned", error=error,
                                    abandoned=step.abandoned + 1))
    else:  # the rule such runs started under: an ordinary retryable failure
        _put(state, values, replace(step, status="attempt_failed", error=error))
    values.update(
        cost=state.cost + step.max_cost,
        tokens_out=state.tokens_out + (step.max_tokens or 0),
        reserved_cost=reserved_cost, reserved_tokens=reserved_tokens)


def _step_failed(state: RunState, event: ev.StepFailed, values: dict[str, Any]) -> None:
    step = _expect(state, event.step, None,
                   ("attempt_failed", "abandoned", "waiting", "running", "scheduled"), event)
    error = {"step": step.key, "type": event.error_type, "message": event.message}
    _put(state, values, replace(step, status="failed", error=error))
    if step.parent is None:
        values["last_error"] = error


def _signal_received(state: RunState, event: ev.SignalReceived, values: dict[str, Any]
                     ) -> None:
    signals = dict(state.signals)
    signals[event.name] = event.payload
    values["inbox"] = (*state.inbox, (event.name, event.payload))
    values["signals"] = signals
    if event.signal_id is not None:
        values["signal_ids"] = {**state.signal_ids, event.signal_id: event.name}


def _limit_reached(state: RunState, event: ev.LimitReached, values: dict[str, Any]) -> None:
    values["limit"] = {"kind": event.limit, "limit": event.limit_value, "used": event.used,
                       "step": event.step}
    parent = state.steps.get(event.step) if event.step else None
    if parent is not None and parent.status == "running" and parent.kind == "map":
        # A map that cannot afford its next item stops scheduling and fails at the join.
        error = {"step": parent.key, "type": f"{event.limit}_limit",
                 "message": f"{event.limit} limit reached"}
        _put(state, values, replace(parent, error=error))


_STATUS_OF_KIND = {"task": "scheduled", "signal": "waiting"}


def _scheduled(state: RunState, event: ev.StepScheduled, values: dict[str, Any]) -> None:
    old = state.steps.get(event.step)
    attempt = event.attempt
    if attempt > 1:
        if old is None or old.status not in ("attempt_failed", "abandoned") or (
            old.attempt != attempt - 1
        ):
            raise InvalidEvent(f"retry of {event.step!r} attempt {attempt} does not apply")
    elif old is not None and old.status not in ("completed", "failed"):
        raise InvalidEvent(f"{event.step!r} scheduled while {old.status}")
    kind = event.kind
    name = event.step.partition("[")[0]
    step = _new_step(
        key=event.step, name=name, kind=kind, status=_STATUS_OF_KIND.get(kind, "running"),
        visit=event.visit, attempt=attempt, reason=event.reason, parent=event.parent,
        item=event.item, items=event.items, not_before=event.not_before,
        max_cost=event.max_cost, max_tokens=event.max_tokens,
        waiting_since=event.at if kind == "signal" else None,
        abandoned=old.abandoned if attempt > 1 and old is not None else 0,
    )
    steps = _put(state, values, step)
    values["reserved_cost"] = state.reserved_cost + event.max_cost
    values["reserved_tokens"] = state.reserved_tokens + (event.max_tokens or 0)
    if attempt == 1:
        if kind == "task" or kind == "signal":
            values["steps_taken"] = state.steps_taken + 1
        if event.parent is None:
            visits = dict(state.visits)
            visits[name] = event.visit
            values["visits"] = visits
            values["current"] = event.step
        else:
            parent = steps.get(event.parent)
            if parent is None or parent.status != "running":
                raise InvalidEvent(f"{event.step!r} scheduled outside its parent")
            steps[event.parent] = replace(parent, scheduled_items=parent.scheduled_items + 1)
    elif old is not None and old.status == "attempt_failed":
        values["retries"] = state.retries + 1  # a re-run of an abandoned attempt is no retry


def _completed(state: RunState, event: ev.StepCompleted, values: dict[str, Any]) -> None:
    step = state.steps.get(event.step)
    if step is None or step.status not in ("succeeded", "waiting", "running"):
        raise InvalidEvent(f"StepCompleted for {event.step!r} does not apply")
    _put(state, values, replace(step, status="completed", output=event.output))
    if step.parent is None:
        outputs = dict(state.outputs)
        outputs[step.name] = event.output
        values["outputs"] = outputs
    if event.signal is not None:
        inbox = list(state.inbox)
        for i, (name, _payload) in enumerate(inbox):
            if name == event.signal:
                del inbox[i]
                break
        else:
            raise InvalidEvent(f"signal {event.signal!r} consumed but none was received")
        values["inbox"] = tuple(inbox)


def _transition_taken(state: RunState, event: ev.TransitionTaken, values: dict[str, Any]
                      ) -> None:
    values["current"] = None


def _timer_fired(state: RunState, event: ev.TimerFired, values: dict[str, Any]) -> None:
    return None


def _cancel_requested(state: RunState, event: ev.CancelRequested, values: dict[str, Any]
                      ) -> None:
    values["cancel_reason"] = event.reason


def _run_completed(state: RunState, event: ev.RunCompleted, values: dict[str, Any]) -> None:
    values.update(status="completed", output=event.output, reason=event.reason, current=None)


def _run_failed(state: RunState, event: ev.RunFailed, values: dict[str, Any]) -> None:
    values.update(status="failed", error_type=event.error_type, reason=event.reason,
                  current=None)


def _run_cancelled(state: RunState, event: ev.RunCancelled, values: dict[str, Any]) -> None:
    values.update(status="cancelled", reason=event.reason, current=None)


# Each fold writes the event's changes into `values`, a copy of the state's field dict.
_FOLDS: dict[type[ev.Event], Callable[[RunState, Any, dict[str, Any]], None]] = {
    ev.RunStarted: _run_started,
    ev.StepScheduled: _scheduled,
    ev.AttemptStarted: _attempt_started,
    ev.AttemptSucceeded: _attempt_succeeded,
    ev.AttemptFailed: _attempt_failed,
    ev.AttemptAbandoned: _attempt_abandoned,
    ev.StepCompleted: _completed,
    ev.StepFailed: _step_failed,
    ev.TransitionTaken: _transition_taken,
    ev.SignalReceived: _signal_received,
    ev.TimerFired: _timer_fired,
    ev.LimitReached: _limit_reached,
    ev.CancelRequested: _cancel_requested,
    ev.RunCompleted: _run_completed,
    ev.RunFailed: _run_failed,
    ev.RunCancelled: _run_cancelled,
}


def replay(events: Iterable[ev.Event], state: RunState | None = None) -> RunState:
    """Fold a whole history (or continue from `state`)."""
    state = state or RunState()
    for event in events:
        state = evolve(state, event)
    return state
