"""One contract, every backend: memory, a real SQLite file and a real PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from uuid import UUID, uuid4

import pytest
from rulebound.adapters.stores import open_store, redact
from rulebound.engine.store import ConcurrencyConflict, EventStore, Record, RunChange, StoreError

T0 = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture
def store(store_url: str) -> Iterator[EventStore]:
    opened = open_store(store_url)
    yield opened
    opened.close()


def records(run_id: UUID, start: int, count: int, topic: str = "StepScheduled") -> list[Record]:
    return [Record(run_id, seq, topic, f'{{"n":{seq}}}'.encode())
            for seq in range(start, start + count)]


def test_append_and_read_in_order(store: EventStore) -> None:
    run = uuid4()
    store.append(records(run, 1, 3))
    store.append(records(run, 4, 2))
    got = store.read(run)
    assert [r.seq for r in got] == [1, 2, 3, 4, 5]
    assert got[0].data == b'{"n":1}'
    assert got[0].run_id == run
    assert [r.seq for r in store.read(run, after=3)] == [4, 5]
    assert store.read(uuid4()) == []


def test_one_append_for_many_runs_is_all_or_nothing(store: EventStore) -> None:
    a, b = uuid4(), uuid4()
    store.append(records(a, 1, 2))
    before = store.last_position()
    with pytest.raises(ConcurrencyConflict) as caught:
        store.append([*records(b, 1, 2), *records(a, 2, 1)])  # a@2 exists
    assert a in caught.value.run_ids
    assert store.read(b) == []  # b's records were not written either
    assert store.last_position() == before
    store.append([*records(b, 1, 2), *records(a, 3, 1)])
    assert [r.seq for r in store.read(a)] == [1, 2, 3]
    assert [r.seq for r in store.read(b)] == [1, 2]


def test_read_all_pages_by_increasing_position(store: EventStore) -> None:
    runs = [uuid4() for _ in range(3)]
    for i, run in enumerate(runs):
        store.append(records(run, 1, 2 + i))
    seen: list[tuple[UUID, int]] = []
    position = 0
    while True:
        page = store.read_all(position, 2)
        if not page:
            break
        assert all(n.position > position for n in page)
        assert [n.position for n in page] == sorted(n.position for n in page)
        seen += [(n.record.run_id, n.record.seq) for n in page]
        position = page[-1].position
    assert len(seen) == 9
    assert position == store.last_position()
    assert [s for r, s in seen if r == runs[2]] == [1, 2, 3, 4]


def test_the_read_model_tracks_runs_and_its_position(store: EventStore) -> None:
    a, b, c = uuid4(), uuid4(), uuid4()
    assert store.run_changes_position() == 0
    store.apply_run_changes([RunChange(a, "running", 1, T0, workflow="w1"),
                             RunChange(b, "running", 1, T0 + timedelta(seconds=1),
                                       workflow="w2")], position=10)
    store.apply_run_changes([RunChange(a, "completed", 7, T0 + timedelta(seconds=5)),
                             RunChange(c, "running", 1, T0 + timedelta(seconds=2),
                                       workflow="w1")], position=20)
    assert store.run_changes_position() == 20
    rows = store.list_runs()
    assert [r.run_id for r in rows] == [c, b, a]  # newest first
    assert [r.run_id for r in store.list_runs(status="running")] == [c, b]
    assert [r.run_id for r in store.list_runs(workflow="w1")] == [c, a]
    assert [r.run_id for r in store.list_runs(limit=1, offset=1)] == [b]
    done = store.list_runs(status="completed")[0]
    assert (done.version, done.workflow, done.created_at, done.updated_at) == (
        7, "w1", T0, T0 + timedelta(seconds=5))
    assert store.count_runs() == {"running": 2, "completed": 1}
    # Replaying changes already applied (a restart before the position moved on) is harmless.
    store.apply_run_changes([RunChange(a, "running", 1, T0, workflow="w1")], position=20)
    assert store.count_runs() == {"running": 2, "completed": 1}


def test_close_is_idempotent(store_url: str) -> None:
    opened = open_store(store_url)
    opened.close()
    opened.close()


@pytest.mark.parametrize("url", [
    "nosuch://x", "sqlite://host/x.db", "sqlite:///", "sqlite:////no/such/folder/x.db",
    "postgresql://user:hunter2@127.0.0.1:1/db?unknown=1",
])
def test_bad_urls_are_clear_errors_without_secrets(url: str) -> None:
    with pytest.raises(StoreError) as caught:
        open_store(url)
    assert "hunter2" not in str(caught.value)
    assert str(caught.value)


@pytest.mark.postgres
def test_postgres_connection_failure_never_shows_the_password() -> None:
    with pytest.raises(StoreError) as caught:
        open_store("postgresql://user:hunter2@127.0.0.1:1/db")
    assert "hunter2" not in str(caught.value)
    assert redact("postgresql://u:hunter2@h:5/d") == "postgresql://u:***@h:5/d"
