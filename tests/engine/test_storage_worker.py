"""The storage worker: group commit across runs, and every failed write settled by reading the
stream back, on every store (memory inline, memory on the writer thread, SQLite, PostgreSQL).

Faults come from the shipped fault layer (rulebound.engine.faults) around a real store."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from uuid import UUID, uuid4

import pytest
from rulebound.adapters.stores import open_store
from rulebound.engine.faults import FaultyStore
from rulebound.engine.storage import StoreWorker
from rulebound.engine.store import (
    ConcurrencyConflict,
    Record,
    StoreError,
    StoreUnavailable,
    WriteOutcomeUnknown,
)


def _faulty(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> FaultyStore:
    if kind.startswith("memory"):
        url = "memory://"
    elif kind == "sqlite":
        url = f"sqlite:///{tmp_path / 'w.db'}"
    else:
        url = str(request.getfixturevalue("postgres_url"))
    store = FaultyStore(open_store(url), seed=1,
                        blocking=True if kind == "memory-threaded" else None)
    assert store.blocking == (kind != "memory-inline")
    return store


@pytest.fixture(params=["memory-inline", "memory-threaded", "sqlite",
                        pytest.param("postgres", marks=pytest.mark.postgres)])
async def faulty(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[FaultyStore]:
    """A real store in the fault layer; the in-memory one both inline (as the engine calls
    it) and on the writer thread (where writes are grouped)."""
    store = _faulty(str(request.param), request, tmp_path)
    yield store
    store.close()


@pytest.fixture(params=["memory-threaded", "sqlite",
                        pytest.param("postgres", marks=pytest.mark.postgres)])
async def grouping(request: pytest.FixtureRequest, tmp_path: Path
                   ) -> AsyncIterator[tuple[FaultyStore, StoreWorker]]:
    """A store called from the writer thread, where writes queued together share one
    transaction (inline writes are never grouped), with its worker."""
    store = _faulty(str(request.param), request, tmp_path)
    worker = StoreWorker(store)
    worker.start()
    yield store, worker
    await worker.close()


@pytest.fixture
async def worker(faulty: FaultyStore) -> AsyncIterator[StoreWorker]:
    worker = StoreWorker(faulty)
    worker.start()
    yield worker
    await worker.close()


def recs(run: UUID, start: int = 1, n: int = 2, tag: str = "ours") -> list[Record]:
    return [Record(run, s, "E", b'{"n":%d,"by":"%s"}' % (s, tag.encode()))
            for s in range(start, start + n)]


@pytest.mark.parametrize("error", ["unavailable", "conflict"])
async def test_an_append_whose_acknowledgement_is_lost_succeeds_and_is_stored_once(
    faulty: FaultyStore, worker: StoreWorker, error: str,
) -> None:
    run = uuid4()
    await worker.append(recs(run, 1, 1))
    faulty.lose_acks(1, error=error)  # type: ignore[arg-type]
    await worker.append(recs(run, 2, 2))  # it landed: success, whatever the store said
    assert faulty.injected["lost_ack"] == 1
    assert faulty.inner.read(run) == recs(run, 1, 3)  # once, byte for byte
    assert faulty.calls["append"] == 2  # settled by reading back, not by writing again
    await worker.append(recs(run, 4, 1))  # and the run goes on at the next position
    assert [r.seq for r in faulty.inner.read(run)] == [1, 2, 3, 4]


async def test_lost_acknowledgements_in_a_group_commit_are_all_successes(
    grouping: tuple[FaultyStore, StoreWorker],
) -> None:
    faulty, worker = grouping
    faulty.hold()  # queue writes behind a held one so that they go in together
    first = asyncio.ensure_future(worker.append(recs(uuid4())))
    assert await asyncio.to_thread(faulty.wait_held)
    runs = [uuid4() for _ in range(10)]
    writes = [asyncio.ensure_future(worker.append(recs(r))) for r in runs]
    await asyncio.sleep(0.05)
    faulty.lose_acks(2, error="conflict")  # the held write's and the group's
    faulty.release()
    await first
    await asyncio.gather(*writes)
    assert worker.batched_writes >= 9  # they did share one transaction
    assert faulty.calls["append"] == 2
    for run in runs:
        assert faulty.inner.read(run) == recs(run)


@pytest.mark.parametrize("error", ["unavailable", "conflict"])
async def test_another_writers_different_bytes_are_a_real_conflict(
    faulty: FaultyStore, worker: StoreWorker, error: str,
) -> None:
    run = uuid4()
    faulty.inner.append(recs(run, 1, 1, tag="theirs"))  # another engine got there first
    if error == "unavailable":
        faulty.fail_next(1)  # our write fails ambiguously: reading back says "theirs"
    with pytest.raises(ConcurrencyConflict) as caught:
        await worker.append(recs(run, 1, 2))
    assert caught.value.run_ids == [run]
    assert faulty.inner.read(run) == recs(run, 1, 1, tag="theirs")


async def test_a_conflict_in_a_group_commit_hurts_only_its_run(
    grouping: tuple[FaultyStore, StoreWorker],
) -> None:
    faulty, worker = grouping
    taken = uuid4()
    await worker.append(recs(taken, 1, 1, tag="theirs"))
    faulty.hold()
    blocker = asyncio.ensure_future(worker.append(recs(uuid4())))
    assert await asyncio.to_thread(faulty.wait_held)
    runs = [uuid4() for _ in range(20)]
    writes = [asyncio.ensure_future(worker.append(recs(r))) for r in runs]
    clash = asyncio.ensure_future(worker.append(recs(taken, 1, 1)))  # seq 1 is theirs
    await asyncio.sleep(0.05)
    commits_before = worker.commits
    faulty.release()
    await blocker
    await asyncio.gather(*writes)
    with pytest.raises(ConcurrencyConflict):
        await clash
    for run in runs:
        assert faulty.inner.read(run) == recs(run)
    assert worker.batched_writes >= 19  # the 20 queued writes went in together
    assert worker.commits - commits_before <= 3


async def test_an_outage_refuses_writes_and_the_next_append_after_it_succeeds(
    faulty: FaultyStore, worker: StoreWorker,
) -> None:
    run = uuid4()
    faulty.outage(0.3)
    with pytest.raises(StoreUnavailable) as caught:
        await worker.append(recs(run))
    # Reading back fails as well during an outage: the outcome is unknown, and says so.
    assert isinstance(caught.value, WriteOutcomeUnknown)
    assert 0 < caught.value.retry_after <= 0.3
    assert caught.value.transient
    assert faulty.inner.read(run) == []
    await asyncio.sleep(0.35)
    assert not faulty.outage_active
    await worker.append(recs(run))
    assert faulty.inner.read(run) == recs(run)


async def test_a_write_refused_before_commit_is_known_unwritten_and_safe_to_retry(
    faulty: FaultyStore, worker: StoreWorker,
) -> None:
    run = uuid4()
    faulty.fail_next(1)
    with pytest.raises(StoreUnavailable) as caught:
        await worker.append(recs(run))
    assert not isinstance(caught.value, WriteOutcomeUnknown)
    assert str(run) in str(caught.value)
    assert faulty.inner.read(run) == []
    await worker.append(recs(run))
    assert faulty.inner.read(run) == recs(run)


async def test_a_write_that_cannot_be_read_back_is_of_unknown_outcome(
    faulty: FaultyStore, worker: StoreWorker,
) -> None:
    run = uuid4()
    faulty.lose_acks(1)
    faulty.fail_next(1, method="read")  # the store goes away before we can look
    with pytest.raises(WriteOutcomeUnknown) as caught:
        await worker.append(recs(run))
    assert caught.value.transient and "reload" in str(caught.value)
    assert faulty.inner.read(run) == recs(run)  # (it had landed)


async def test_a_permanent_error_is_not_transient(
    faulty: FaultyStore, worker: StoreWorker,
) -> None:
    run = uuid4()
    faulty.fail_next(1, error=lambda: StoreError("value too long for type"))
    with pytest.raises(StoreError) as caught:
        await worker.append(recs(run))
    assert not caught.value.transient
    assert not isinstance(caught.value, StoreUnavailable)
    assert faulty.inner.read(run) == []


async def test_a_closed_worker_refuses_writes(worker: StoreWorker) -> None:
    await worker.close()
    with pytest.raises(StoreError):
        await worker.append(recs(uuid4()))


async def test_a_large_group_commit_resumes_its_callers_a_slice_per_loop_iteration(
    grouping: tuple[FaultyStore, StoreWorker],
) -> None:
    """Writes that share one transaction do not all resume in one loop iteration: each
    resumed caller finishes its commit there, and 200 of them would stall timers and sockets
    for tens of milliseconds (benchmarks/inflight_bench.py)."""
    store, worker = grouping
    store.hold()
    writes = [asyncio.create_task(worker.append(recs(uuid4(), 1, 1))) for _ in range(200)]
    try:
        await asyncio.sleep(0)  # every append is handed over: one held, 199 queued behind it
        assert await asyncio.to_thread(store.wait_held, 1)
    finally:
        store.release()
    per_iteration: list[int] = []
    done = 0
    while done < len(writes):
        await asyncio.sleep(0)  # one loop iteration
        now = sum(w.done() for w in writes)
        if now > done:
            per_iteration.append(now - done)
        done = now
    for write in writes:
        write.result()  # all stored
    assert sum(per_iteration) == 200
    assert max(per_iteration) <= 64, per_iteration
