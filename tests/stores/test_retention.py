"""Removing runs (`delete_runs`) and keeping snapshots, on every store: what goes, what stays,
and that store-wide positions are never handed out twice."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from rulebound.adapters.stores import open_store
from rulebound.engine.storage import StoreWorker
from rulebound.engine.store import EventStore, Record, RunChange, Snapshot


def _run(store: EventStore, events: int, topic_end: str = "RunCompleted") -> uuid.UUID:
    run_id = uuid.uuid4()
    at = datetime(2025, 1, 1, tzinfo=UTC).isoformat()
    records = [Record(run_id, 1, "RunStarted",
                      b'{"event":{"at":"%b","workflow":"w"},"hash":"h","id":"i"}' % at.encode())]
    records += [Record(run_id, seq, "StepScheduled", b'{"event":{},"hash":"h","id":"i"}')
                for seq in range(2, events)]
    records.append(Record(run_id, events, topic_end,
                          b'{"event":{"at":"%b"},"hash":"h","id":"i"}' % at.encode()))
    store.append(records)
    return run_id


async def _project(store: EventStore) -> None:
    worker = StoreWorker(store)
    worker.start()
    try:
        await worker.project()
    finally:
        await worker.close(close_store=False)


async def test_delete_runs_removes_events_row_and_snapshot_only_at_the_secured_count(
        store_url: str) -> None:
    store = open_store(store_url)
    try:
        a, b, c = _run(store, 3), _run(store, 4), _run(store, 5)
        await _project(store)
        store.write_snapshot(Snapshot(a, 3, b"state of a"))
        assert store.read_snapshot(a) == Snapshot(a, 3, b"state of a")
        listed = {row.run_id for row in store.list_runs()}
        assert {a, b, c} <= listed
        # b: the caller secured 3 events but the log holds 4 -> left alone; an unknown run
        # and a wrong count are not reported as removed
        removed = store.delete_runs({a: 3, b: 3, uuid.uuid4(): 2})
        assert removed == [a]
        assert store.read(a) == [] and store.read_snapshot(a) is None
        assert [r.seq for r in store.read(b)] == [1, 2, 3, 4]
        assert {row.run_id for row in store.list_runs()} == listed - {a}
        assert store.count_runs() == {"completed": len(listed) - 1}
        assert store.delete_runs({b: 4, c: 5}) in ([b, c], [c, b])
        assert store.read(b) == store.read(c) == []
        assert store.list_runs() == []
        assert store.delete_runs({b: 4}) == []  # gone already: nothing to report
        # no orphan snapshot for a run that is gone
        store.write_snapshot(Snapshot(b, 4, b"late"))
        assert store.read_snapshot(b) is None
    finally:
        store.close()


async def test_positions_of_removed_events_are_never_handed_out_again(store_url: str) -> None:
    store = open_store(store_url)
    try:
        first = _run(store, 3)
        last = _run(store, 4)  # holds the top positions of the table
        top = store.last_position()
        await _project(store)
        assert store.delete_runs({last: 4}) == [last]
        later = _run(store, 2)
        fresh = store.read_all(top, 100)
        assert [n.record.run_id for n in fresh] == [later, later]
        assert all(n.position > top for n in fresh)
        # reading everything skips what was removed (and any keeper of the top position)
        everything = store.read_all(0, 100)
        assert [n.record.run_id for n in everything] == [first] * 3 + [later] * 2
        assert [len(store.read_all(0, k)) for k in (1, 3, 4, 5)] == [1, 3, 4, 5]
        # the read model follows: the new run is listed, the removed one is not back
        await _project(store)
        assert {row.run_id for row in store.list_runs()} == {first, later}
        assert store.delete_runs({first: 3, later: 2}) in ([first, later], [later, first])
        assert store.read_all(0, 100) == []
        again = _run(store, 2)
        assert all(n.position > top for n in store.read_all(0, 100))
        assert [n.record.run_id for n in store.read_all(0, 100)] == [again, again]
    finally:
        store.close()


def test_the_last_snapshot_written_is_kept_unless_the_log_lacks_its_version(
        store_url: str) -> None:
    store = open_store(store_url)
    try:
        run = _run(store, 6)
        assert store.read_snapshot(run) is None
        store.write_snapshot(Snapshot(run, 2, b"two"))
        store.write_snapshot(Snapshot(run, 5, b"five"))
        assert store.read_snapshot(run) == Snapshot(run, 5, b"five")
        store.write_snapshot(Snapshot(run, 5, b"five, rebuilt"))  # a stale one is replaced
        assert store.read_snapshot(run) == Snapshot(run, 5, b"five, rebuilt")
        store.write_snapshot(Snapshot(run, 3, b"three"))  # even by an older version
        assert store.read_snapshot(run) == Snapshot(run, 3, b"three")
        store.write_snapshot(Snapshot(run, 9, b"beyond the log"))  # no event 9: ignored
        assert store.read_snapshot(run) == Snapshot(run, 3, b"three")
    finally:
        store.close()


def test_the_read_model_row_goes_with_the_events(sqlite_url: str) -> None:
    store = open_store(sqlite_url)
    try:
        run = _run(store, 3)
        store.apply_run_changes([RunChange(run, "completed", 3, datetime.now(UTC), "w")], 3)
        assert store.delete_runs({run: 3}) == [run]
        assert store.list_runs() == []
    finally:
        store.close()
