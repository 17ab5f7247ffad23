"""Events round-trip exactly through the stored format; domain/ stays pure."""

from __future__ import annotations

import ast
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

from hypothesis import given, settings
from hypothesis import strategies as st
from rulebound.domain import events as ev
from rulebound.engine import codec

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4),
    max_leaves=12)
times = st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1),
                     timezones=st.just(UTC))
usage = st.builds(ev.Usage, tokens_in=st.integers(0, 10**6), tokens_out=st.integers(0, 10**6),
                  cost=st.floats(0, 100, allow_nan=False))
text = st.text(max_size=30)


def event_strategy(cls: type[ev.Event]) -> st.SearchStrategy[ev.Event]:
    overrides: dict[str, Any] = {
        "at": times, "input": json_values, "output": json_values, "payload": json_values,
        "limits": st.dictionaries(text, json_values, max_size=3), "usage": usage,
        "values": st.dictionaries(text, json_values, max_size=3),
        "not_before": times, "deadline": times, "retry_after": st.none() | times,
        "in_flight": st.lists(text, max_size=3), "seed": st.integers(0, 2**63 - 1),
        "limit_value": st.floats(0, 1e9), "used": st.floats(0, 1e9),
        "max_cost": st.floats(0, 1e3), "latency": st.floats(0, 1e3),
        "attempt": st.integers(1, 100), "visit": st.integers(1, 100),
        "item": st.none() | st.integers(0, 10**4), "items": st.none() | st.integers(0, 10**4),
        "max_tokens": st.none() | st.integers(0, 10**6),
    }
    fields = {name: overrides[name] for name in cls.model_fields if name in overrides}
    return st.builds(cls, **fields)


any_event = st.one_of(*(event_strategy(cls) for cls in ev.EVENT_TYPES.values()))


@settings(max_examples=400, deadline=None)
@given(event=any_event, n=st.integers(1, 2**40))
def test_every_event_round_trips_exactly_through_the_stored_format(event: ev.Event,
                                                                   n: int) -> None:
    event_id = UUID(int=n, version=4)
    digest, data = codec.stamp(event, event_id, codec.GENESIS_HASH)
    back = codec.decode(data)
    assert type(back) is type(event)
    assert back.body() == event.body()
    assert back.id == event_id
    assert back.hash == digest
    assert codec.canonical_body(back) == codec.canonical_body(event)
    assert codec.chain_hash(codec.GENESIS_HASH, codec.canonical_body(back)) == digest
    assert codec.encode(back) == data


HOT_PATH_EVENTS = (ev.StepScheduled, ev.TransitionTaken, ev.StepCompleted, ev.AttemptStarted,
                   ev.AttemptSucceeded)


@settings(max_examples=300, deadline=None)
@given(event=st.one_of(*(event_strategy(cls) for cls in HOT_PATH_EVENTS)))
def test_trusted_construction_equals_validated_construction(event: ev.Event) -> None:
    # The decider and engine build these without validation; given well-typed values the
    # result must be indistinguishable: same fields, same order, same bytes, same hash.
    values = {k: v for k, v in event.__dict__.items() if k in event.model_fields_set}
    built = ev.trusted(type(event), **values)
    assert built == event
    assert list(built.__dict__) == list(event.__dict__)
    assert built.model_fields_set == event.model_fields_set
    assert codec.stamp(built, UUID(int=7), codec.GENESIS_HASH) == codec.stamp(
        event, UUID(int=7), codec.GENESIS_HASH)
    if "values" in type(event).model_fields and "values" not in values:
        assert built.values is not ev.trusted(type(event), **values).values  # fresh default


def test_every_event_type_is_in_the_vocabulary() -> None:
    assert set(ev.EVENT_TYPES) == {
        "RunStarted", "StepScheduled", "AttemptStarted", "AttemptSucceeded", "AttemptFailed",
        "AttemptAbandoned", "StepCompleted", "StepFailed", "TransitionTaken", "SignalReceived",
        "TimerFired", "LimitReached", "CancelRequested", "RunCompleted", "RunFailed",
        "RunCancelled"}
    assert {"StepScheduled", "StepCompleted", "StepFailed",
                                 "TransitionTaken", "LimitReached", "RunCompleted",
                                 "RunFailed", "RunCancelled"} == ev.DECIDER_EVENTS


def test_events_are_immutable() -> None:
    event = ev.TimerFired(at=datetime.now(UTC), timer="deadline")
    try:
        event.timer = "other"  # type: ignore[misc]
    except Exception:  # pydantic's frozen-instance error
        pass
    else:
        raise AssertionError("an event could be changed")
    assert event.timer == "deadline"


def test_integers_beyond_json_range_are_refused_at_the_boundary() -> None:
    import pytest
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        ev.Usage(tokens_in=2**70)
    with pytest.raises(ValidationError):
        ev.AttemptStarted(at=datetime.now(UTC), step="s", attempt=0, executor="x",
                          worker="w", deadline=datetime.now(UTC))
    assert codec.check_json({"n": 2**70}) is not None
    assert codec.check_json({"n": 2**53}) is None


def test_timestamps_keep_their_microseconds_and_zone() -> None:
    at = datetime(2026, 5, 1, 12, 0, 0, 123456, tzinfo=UTC) + timedelta(microseconds=1)
    _, data = codec.stamp(ev.TimerFired(at=at, timer="t"), UUID(int=1, version=4), "0" * 64)
    assert codec.decode(data).at == at


FORBIDDEN = {"asyncio", "aiohttp", "sqlite3", "socket", "psycopg", "threading", "time",
             "random", "os", "subprocess", "requests", "orjson", "engine", "adapters",
             "multiprocessing", "secrets", "urllib", "http", "selectors", "signal"}
ALLOWED_ROOTS = {"__future__", "collections", "dataclasses", "datetime", "typing", "json",
                 "hashlib", "math", "re", "bisect", "enum", "functools", "itertools",
                 "pydantic", "uuid", "types", "abc"}


def test_domain_imports_no_io_no_clock_no_randomness_and_no_outer_layer() -> None:
    root = Path(__file__).resolve().parents[2] / "domain"
    seen: dict[str, set[str]] = {}
    for path in sorted(root.glob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                mods = [node.module or ""] if node.level == 0 else []
            elif isinstance(node, ast.Call):
                # datetime.now(), uuid4(), random.random(), time.time(): clocks and randomness
                func = node.func
                called = func.attr if isinstance(func, ast.Attribute) else getattr(
                    func, "id", "")
                assert called not in ("now", "utcnow", "today", "uuid1", "uuid4", "random",
                                      "randint", "time", "monotonic", "perf_counter"), (
                    f"{path.name}:{node.lineno} calls {called}()")
                continue
            else:
                continue
            for mod in mods:
                top = mod.split(".")[0]
                seen.setdefault(path.name, set()).add(top)
                assert top not in FORBIDDEN, f"{path.name} imports {mod}"
                assert top in ALLOWED_ROOTS or top == "", f"{path.name} imports {mod}"
    assert "decider.py" in seen  # the check did read the files
