"""The fault layer itself (rulebound.engine.faults.FaultyStore): each fault does what it says,
random faults are reproducible from their seed, and an Engine runs on a faulty store."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any
from uuid import UUID, uuid4

import pytest
from rulebound.adapters.stores import open_store
from rulebound.domain import END, FAIL, Step, Workflow
from rulebound.engine import Engine, Task
from rulebound.engine.faults import FaultyStore
from rulebound.engine.store import ConcurrencyConflict, Record, StoreError, StoreUnavailable


def recs(run: UUID, start: int = 1, n: int = 1) -> list[Record]:
    return [Record(run, s, "E", b'{"n":%d}' % s) for s in range(start, start + n)]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def faulty(clock: Clock) -> Iterator[FaultyStore]:
    store = FaultyStore(open_store("memory://"), seed=3, clock=clock, sleep=clock.sleep)
    yield store
    store.close()


def test_fail_next_refuses_that_many_calls_of_that_method_without_writing(
    faulty: FaultyStore,
) -> None:
    run = uuid4()
    faulty.fail_next(2)
    for _ in range(2):
        with pytest.raises(StoreUnavailable, match="injected"):
            faulty.append(recs(run))
    assert faulty.read(run) == []  # reads were not affected, and nothing was written
    faulty.append(recs(run))
    faulty.fail_next(1, method="read", error=lambda: StoreError("no such table"))
    with pytest.raises(StoreError, match="no such table") as caught:
        faulty.read(run)
    assert not caught.value.transient
    assert faulty.read(run) == recs(run)
    assert faulty.injected["failed"] == 3


@pytest.mark.parametrize(("error", "kind"), [("unavailable", StoreUnavailable),
                                              ("conflict", ConcurrencyConflict)])
def test_a_lost_acknowledgement_writes_then_raises(faulty: FaultyStore, error: str,
                                                   kind: type[Exception]) -> None:
    run = uuid4()
    faulty.lose_acks(1, error=error)  # type: ignore[arg-type]
    with pytest.raises(kind, match="injected"):
        faulty.append(recs(run))
    assert faulty.inner.read(run) == recs(run)
    faulty.append(recs(run, 2))  # one only
    assert faulty.injected["lost_ack"] == 1


def test_an_outage_refuses_every_call_until_it_ends(faulty: FaultyStore, clock: Clock) -> None:
    run = uuid4()
    faulty.append(recs(run))
    ends = faulty.outage(2.0)
    assert ends == clock.now + 2.0 and faulty.outage_active
    clock.now += 0.5
    calls = [lambda: faulty.append(recs(run, 2)), lambda: faulty.read(run),
             faulty.last_position, faulty.count_runs, lambda: faulty.read_all(0, 10)]
    for call in calls:
        with pytest.raises(StoreUnavailable) as caught:
            call()
        assert caught.value.retry_after == pytest.approx(1.5)
    clock.now += 1.5
    assert not faulty.outage_active
    faulty.append(recs(run, 2))
    assert [r.seq for r in faulty.read(run)] == [1, 2]
    faulty.close()  # close is never faulted, even in an outage
    faulty.outage(5)
    faulty.close()


def test_slow_and_random_delays_sleep_before_the_call(clock: Clock) -> None:
    store = FaultyStore(open_store("memory://"), seed=1, delay=(0.01, 0.02), methods=["read"],
                        clock=clock, sleep=clock.sleep, announce=None)
    store.read(uuid4())
    assert len(clock.slept) == 1 and 0.01 <= clock.slept[0] <= 0.02
    store.append(recs(uuid4()))  # not one of `methods`
    assert len(clock.slept) == 1
    store.slow(0.5, method="append")
    store.append(recs(uuid4()))
    assert clock.slept[-1] == 0.5
    store.heal()
    store.append(recs(uuid4()))
    assert len(clock.slept) == 2


def test_random_faults_are_reproducible_from_the_announced_seed() -> None:
    def outcomes(store: FaultyStore) -> list[str]:
        seen = []
        for _ in range(200):
            try:
                store.append(recs(uuid4()))
                seen.append("ok")
            except StoreError as exc:
                seen.append(type(exc).__name__)
        return seen

    said: list[str] = []
    first = FaultyStore(open_store("memory://"), lost_ack_rate=0.1, fail_rate=0.1,
                        announce=said.append)
    assert said == [f"FaultyStore seed={first.seed} (lost_ack_rate=0.1, fail_rate=0.1, "
                    "outage_rate=0.0, delay=0.0)"]
    again = FaultyStore(open_store("memory://"), seed=first.seed, lost_ack_rate=0.1,
                        fail_rate=0.1, announce=None)
    seen = outcomes(first)
    assert seen == outcomes(again)
    assert {"ok", "StoreUnavailable", "ConcurrencyConflict"} <= set(seen)
    assert 5 <= first.injected["lost_ack"] <= 40 and 5 <= first.injected["failed"] <= 40


def test_random_outages_last_outage_seconds(clock: Clock) -> None:
    store = FaultyStore(open_store("memory://"), seed=5, outage_rate=1.0, outage_seconds=2,
                        clock=clock, sleep=clock.sleep, announce=None)
    with pytest.raises(StoreUnavailable):
        store.last_position()
    store.outage_rate = 0.0
    clock.now += 1.9
    with pytest.raises(StoreUnavailable):
        store.last_position()
    clock.now += 0.2
    assert store.last_position() == 0


def test_blocking_follows_the_wrapped_store_unless_given(tmp_path: Any) -> None:
    memory = FaultyStore(open_store("memory://"), announce=None)
    assert memory.blocking is False  # the engine keeps calling it inline
    with pytest.raises(StoreError, match="inline"):
        memory.hold()  # it would stall the loop
    assert FaultyStore(open_store("memory://"), blocking=True).blocking is True
    sqlite = FaultyStore(open_store(f"sqlite:///{tmp_path / 'f.db'}"))
    assert sqlite.blocking is True
    sqlite.close()


def test_bad_settings_are_refused() -> None:
    inner = open_store("memory://")
    with pytest.raises(ValueError, match="lost_ack_rate"):
        FaultyStore(inner, lost_ack_rate=1.5)
    with pytest.raises(ValueError, match="unknown store methods"):
        FaultyStore(inner, methods=["apend"])
    with pytest.raises(ValueError, match="unknown store method"):
        FaultyStore(inner).fail_next(1, method="apend")
    with pytest.raises(ValueError, match="delay"):
        FaultyStore(inner, delay=(0.2, 0.1))
    with pytest.raises(ValueError, match="not 'read'"):
        FaultyStore(inner).lose_acks(1, method="read")
    with pytest.raises(ValueError, match="lease cycle"):
        FaultyStore(inner).lose_acks(1, method="lease_cycle", error="conflict")


# --- an Engine on a faulty store ------------------------------------------------------------

async def echo(task: Task) -> Any:
    return {"step": task.step}


def linear(n: int = 3) -> Workflow:
    return Workflow("linear", on_failure=FAIL, steps=[
        Step(f"s{i}", executor="echo", next=f"s{i + 1}" if i + 1 < n else END)
        for i in range(n)])


async def test_an_engine_runs_on_a_store_that_loses_acknowledgements(store_url: str) -> None:
    """Every third append lands but reports a failure (a conflict or a lost connection);
    the runs still complete, each step once."""
    store = FaultyStore(open_store(store_url), seed=11, lost_ack_rate=0.3)
    async with Engine(store, [linear()], {"echo": echo}) as engine:
        runs = [await engine.start("linear", {"i": i}) for i in range(8)]
        for run_id in runs:
            view = await engine.wait(run_id, timeout=20)
            assert view.status == "completed", (store.seed, view.status)
        for run_id in runs:
            started = [r for r in store.inner.read(run_id) if r.topic == "AttemptStarted"]
            assert len(started) == 3, store.seed  # no step ran twice
    assert store.injected["lost_ack"] >= 1, "no acknowledgement was lost: the test proved nothing"
