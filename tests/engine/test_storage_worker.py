"""The storage worker: group commit across runs, and ambiguous writes settled by reading back."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from pathlib import Path
from uuid import uuid4

import pytest
from rulebound.adapters.stores import open_store
from rulebound.engine.storage import StoreWorker
from rulebound.engine.store import ConcurrencyConflict, Record, StoreError


class Flaky:
    """Wraps a real store; the next append fails in a chosen way."""

    def __init__(self, inner: object) -> None:
        self.inner = inner
        self.mode: str | None = None
        self.appends = 0
        self.gate = threading.Event()
        self.gate.set()

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    def append(self, records: Sequence[Record]) -> None:
        self.gate.wait()
        self.appends += 1
        mode, self.mode = self.mode, None
        if mode == "commit-then-fail":
            self.inner.append(records)  # type: ignore[attr-defined]
            raise OSError("connection reset after COMMIT")
        if mode == "fail-before-commit":
            raise OSError("connection reset before COMMIT")
        if mode == "someone-else-wrote":
            first = records[0]
            self.inner.append([Record(first.run_id, first.seq, first.topic, b'{"other":1}')])  # type: ignore[attr-defined]
            raise OSError("connection reset")
        self.inner.append(records)  # type: ignore[attr-defined]


@pytest.fixture
def flaky(tmp_path: Path) -> Flaky:
    return Flaky(open_store(f"sqlite:///{tmp_path / 'w.db'}"))


def recs(run, start: int = 1, n: int = 2) -> list[Record]:
    return [Record(run, s, "E", b'{"n":%d}' % s) for s in range(start, start + n)]


async def test_a_write_that_committed_before_the_error_counts_as_done(flaky: Flaky) -> None:
    worker = StoreWorker(flaky)  # type: ignore[arg-type]
    worker.start()
    run = uuid4()
    flaky.mode = "commit-then-fail"
    await worker.append(recs(run))  # settled by reading back: it is there, byte for byte
    assert [r.seq for r in flaky.inner.read(run)] == [1, 2]  # type: ignore[attr-defined]
    assert flaky.appends == 1  # and it was not written again
    await worker.close()


async def test_a_write_that_did_not_commit_is_written_once_more(flaky: Flaky) -> None:
    worker = StoreWorker(flaky)  # type: ignore[arg-type]
    worker.start()
    run = uuid4()
    flaky.mode = "fail-before-commit"
    await worker.append(recs(run))
    assert [r.seq for r in flaky.inner.read(run)] == [1, 2]  # type: ignore[attr-defined]
    assert flaky.appends == 2
    await worker.close()


async def test_a_write_whose_place_was_taken_is_a_conflict(flaky: Flaky) -> None:
    worker = StoreWorker(flaky)  # type: ignore[arg-type]
    worker.start()
    run = uuid4()
    flaky.mode = "someone-else-wrote"
    with pytest.raises(ConcurrencyConflict):
        await worker.append(recs(run))
    assert [r.data for r in flaky.inner.read(run)] == [b'{"other":1}']  # type: ignore[attr-defined]
    await worker.close()


async def test_concurrent_writes_share_a_transaction_and_a_conflict_hurts_only_its_run(
    flaky: Flaky,
) -> None:
    worker = StoreWorker(flaky)  # type: ignore[arg-type]
    worker.start()
    taken = uuid4()
    await worker.append(recs(taken, 1, 1))
    flaky.gate.clear()  # hold the writer so the next writes queue up together
    blocker = asyncio.ensure_future(worker.append(recs(uuid4())))
    await asyncio.sleep(0.05)
    runs = [uuid4() for _ in range(20)]
    writes = [asyncio.ensure_future(worker.append(recs(r))) for r in runs]
    clash = asyncio.ensure_future(worker.append(recs(taken, 1, 1)))  # seq 1 exists
    await asyncio.sleep(0.05)
    commits_before = worker.commits
    flaky.gate.set()
    await blocker
    await asyncio.gather(*writes)
    with pytest.raises(ConcurrencyConflict):
        await clash
    for run in runs:
        assert len(flaky.inner.read(run)) == 2  # type: ignore[attr-defined]
    assert worker.batched_writes >= 19  # the 20 queued writes went in together
    assert worker.commits - commits_before <= 3
    await worker.close()


async def test_a_closed_worker_refuses_writes(flaky: Flaky) -> None:
    worker = StoreWorker(flaky)  # type: ignore[arg-type]
    worker.start()
    await worker.close()
    with pytest.raises(StoreError):
        await worker.append(recs(uuid4()))
