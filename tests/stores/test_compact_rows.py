"""Stored layout v2 (engine/codec.py): the durable stores write compact rows and read every row
back as the v1 bytes the engine wrote; stores holding v1 rows still load and verify."""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from uuid import UUID

import psycopg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rulebound.adapters.cli import main
from rulebound.adapters.stores import open_store
from rulebound.domain import events as ev
from rulebound.engine import Engine, codec, load_app
from rulebound.engine.store import Record

from tests.audit.test_verify import until_waiting, write_app
from tests.domain.test_events_and_purity import any_event

Rows = Callable[[UUID], list[tuple[int, bytes]]]
Put = Callable[[UUID, int, bytes], None]


def test_the_v2_dictionary_never_changes() -> None:
    """Rows written with it must inflate forever: a new dictionary is a new version."""
    assert hashlib.sha256(codec._ZDICT_V2).hexdigest() == (
        "0ae92ad4035248c19fbb0685de8f520088dae9a85c2523fd998459ad48b0ebdb")


@settings(max_examples=400, deadline=None)
@given(event=any_event, run_id=st.uuids(), seq=st.integers(1, 2**48 - 1))
def test_v1_to_v2_to_decode_round_trips_body_hash_and_id(event: ev.Event, run_id: UUID,
                                                          seq: int) -> None:
    event_id = codec.event_id(run_id, seq)
    digest, v1 = codec.stamp(event, event_id, codec.GENESIS_HASH)
    v2 = codec.compact(v1, run_id, seq)
    assert v2[:1] == codec.V2 and v2[1:33].hex() == digest
    assert codec.expand(v2, run_id, seq) == v1
    back = codec.decode(v2, run_id=run_id, seq=seq)
    assert type(back) is type(event)
    assert codec.canonical_body(back) == codec.canonical_body(event)
    assert back.hash == digest and str(back.id) == event_id
    assert codec.decode(v1) == back


def test_a_body_larger_than_the_compressors_window_round_trips() -> None:
    run_id = uuid.uuid4()
    output = {"text": "".join(str(uuid.uuid4()) for _ in range(3000))}  # about 110 KB
    event = ev.StepCompleted(at=datetime(2026, 1, 1, tzinfo=UTC), step="s", visit=1,
                             output=output)
    _, v1 = codec.stamp(event, codec.event_id(run_id, 7), codec.GENESIS_HASH)
    v2 = codec.compact(v1, run_id, 7)
    assert v2[:1] == codec.V2 and codec.expand(v2, run_id, 7) == v1


def test_event_ids_are_unique_per_run_and_seq_and_keep_the_uuid_shape() -> None:
    runs = [uuid.uuid4() for _ in range(50)]
    ids = {codec.event_id(r, s) for r in runs for s in range(1, 201)}
    assert len(ids) == 50 * 200
    assert all(str(UUID(i)) == i for i in ids)
    run = uuid.uuid4()
    assert UUID(codec.event_id(run, 1)).version == run.version


def test_payloads_that_are_not_exactly_v1_with_the_derived_id_stay_as_they_are() -> None:
    run_id = uuid.uuid4()
    event = ev.TimerFired(at=datetime(2026, 1, 1, tzinfo=UTC), timer="t")
    _, random_id = codec.stamp(event, uuid.uuid4(), codec.GENESIS_HASH)  # an older engine's
    _, derived = codec.stamp(event, codec.event_id(run_id, 3), codec.GENESIS_HASH)
    upper = derived.replace(derived[-110:-46], derived[-110:-46].upper())
    renamed = derived.replace(b'{"event"', b'{"evenT"')
    for data in (random_id, upper, derived + b" ", b"{}", b"", renamed):
        assert codec.compact(data, run_id, 3) == data
    assert codec.compact(derived, run_id, 4) == derived  # the id belongs to another place
    assert codec.compact(derived, run_id, 3)[:1] == codec.V2


# --- real stores ---------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, Rows, Put]]:
    """A store URL, and raw access to its rows: what is on disk, and a way to edit it."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'runs.db'}"
        db = sqlite3.connect(tmp_path / "runs.db")

        def rows(run_id: UUID) -> list[tuple[int, bytes]]:
            return [(s, bytes(d)) for s, d in db.execute(
                "SELECT originator_version, state FROM rulebound_events WHERE originator_id = ?"
                " ORDER BY originator_version", (run_id.hex,))]

        def put(run_id: UUID, seq: int, data: bytes) -> None:
            db.execute("UPDATE rulebound_events SET state = ? WHERE originator_id = ? AND "
                       "originator_version = ?", (data, run_id.hex, seq))
            db.commit()

        yield url, rows, put
        db.close()
        return
    url = request.getfixturevalue("postgres_url")
    pg = psycopg.connect(url, autocommit=True)

    def pg_rows(run_id: UUID) -> list[tuple[int, bytes]]:
        return [(s, bytes(d)) for s, d in pg.execute(
            "SELECT originator_version, state FROM rulebound_events WHERE originator_id = %s"
            " ORDER BY originator_version", (run_id,))]

    def pg_put(run_id: UUID, seq: int, data: bytes) -> None:
        pg.execute("UPDATE rulebound_events SET state = %s WHERE originator_id = %s AND "
                   "originator_version = %s", (data, run_id, seq))

    yield url, pg_rows, pg_put
    pg.close()


def _started(url: str, app: str) -> UUID:
    async def run() -> UUID:
        async with Engine(url, registry=load_app(app)) as engine:
            run_id = await engine.start("audited", {"ticket": 1})
            await until_waiting(engine, run_id)
            return run_id
    return asyncio.run(run())


def _finished(url: str, app: str, run_id: UUID) -> list[ev.Event]:
    async def run() -> list[ev.Event]:
        async with Engine(url, registry=load_app(app)) as engine:
            await engine.signal(run_id, "ok", {"by": "auditor"})
            assert (await engine.wait(run_id, timeout=10)).status == "completed"
            return await engine.events(run_id)
    return asyncio.run(run())


def _verify(url: str, app: str, run_id: UUID, capsys: pytest.CaptureFixture[str],
            tmp: Path) -> tuple[int, str]:
    """`replay --verify` against the store, and `export` then `verify` offline: both must
    agree; returns the exit code and what replay printed."""
    code = main(["replay", str(run_id), "--verify", "--store", url, "--app", app])
    out = capsys.readouterr().out
    export = tmp / f"{run_id}.jsonl"
    assert main(["export", str(run_id), "--store", url, "-o", str(export)]) == 0
    capsys.readouterr()
    assert (main(["verify", str(export), "--app", app]) == 0) == (code == 0)
    capsys.readouterr()
    return code, out


def test_a_run_begun_on_v1_rows_and_continued_on_v2_loads_folds_and_verifies(
    backend: tuple[str, Rows, Put], tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    url, rows, put = backend
    app = write_app(tmp_path / "app.py")
    run_id = _started(url, app)
    # What an engine before v2 stored for these events: the same bodies and hashes, v1 rows,
    # ids from a random per-engine prefix and a counter.
    prefix = str(uuid.uuid4())[:24]
    for seq, data in rows(run_id):
        v1 = codec.expand(data, run_id, seq)
        put(run_id, seq, v1[:-38] + f"{prefix}{seq + 100:012x}".encode() + b'"}')
    old = rows(run_id)
    assert old and all(data[:1] == b"{" for _, data in old)

    events = _finished(url, app, run_id)
    after = rows(run_id)
    assert after[:len(old)] == old  # the old rows are left as they were
    assert len(after) > len(old) and all(d[:1] == codec.V2 for _, d in after[len(old):])
    assert [str(e.id) for e in events[:len(old)]] == [
        f"{prefix}{seq + 100:012x}" for seq, _ in old]
    assert [str(e.id) for e in events[len(old):]] == [
        codec.event_id(run_id, seq) for seq, _ in after[len(old):]]
    code, out = _verify(url, app, run_id, capsys, tmp_path)
    assert code == 0, out
    assert f"head: {events[-1].hash}" in out

    store = open_store(url)  # the store hands out v1 bytes whatever the row holds
    try:
        records = store.read(run_id)
        assert all(r.data[:1] == b"{" for r in records)
        assert [codec.decode(r.data) for r in records] == events
    finally:
        store.close()


@pytest.mark.parametrize("edit", ["body", "hash"])
def test_an_edited_v2_row_fails_verification_as_an_edited_v1_row_does(
    backend: tuple[str, Rows, Put], tmp_path: Path, capsys: pytest.CaptureFixture[str],
    edit: str,
) -> None:
    url, rows, put = backend
    app = write_app(tmp_path / "app.py")
    run_id = _started(url, app)
    events = _finished(url, app, run_id)
    stored = rows(run_id)
    assert all(data[:1] == codec.V2 for _, data in stored)
    assert _verify(url, app, run_id, capsys, tmp_path)[0] == 0
    seq, data = stored[len(stored) // 2]
    v1 = codec.expand(data, run_id, seq)

    # The same edit to either layout: one bit of the body's first bytes, or of the hash.
    if edit == "body":
        edits = [v1[:12] + bytes([v1[12] ^ 1]) + v1[13:], data[:36] + bytes([data[36] ^ 1])
                 + data[37:]]
    else:
        raw = data[1:2] + bytes([data[2] ^ 1]) + data[3:33]
        edits = [v1.replace(data[1:33].hex().encode(), raw.hex().encode()),
                 data[:1] + raw + data[33:]]
    outcomes = []
    for layout, tampered in zip(("v1", "v2"), edits, strict=True):
        put(run_id, seq, tampered)
        code, out = _verify(url, app, run_id, capsys, tmp_path)
        outcomes.append(code)
        assert code == 2, out
        assert f"FAILED: run {run_id}: event {seq}:" in out, out
        if layout == "v2" and edit == "body":  # the deflated body no longer inflates
            assert "unreadable" in out and "does not inflate" in out, out
    assert outcomes[0] == outcomes[1]
    put(run_id, seq, data)
    assert _verify(url, app, run_id, capsys, tmp_path)[0] == 0
    assert events


def test_the_store_writes_v2_only_for_v1_payloads_it_can_rebuild(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'runs.db'}")
    run_id = uuid.uuid4()
    event = ev.TimerFired(at=datetime(2026, 1, 1, tzinfo=UTC), timer="t")
    _, derived = codec.stamp(event, codec.event_id(run_id, 1), codec.GENESIS_HASH)
    other = b'{"not": "an event"}'
    try:
        store.append([Record(run_id, 1, "TimerFired", derived), Record(run_id, 2, "X", other)])
        assert [r.data for r in store.read(run_id)] == [derived, other]
        assert [n.record.data for n in store.read_all(0, 10)] == [derived, other]
    finally:
        store.close()
    db = sqlite3.connect(tmp_path / "runs.db")
    (first,), (second,) = db.execute("SELECT state FROM rulebound_events ORDER BY rowid")
    db.close()
    assert bytes(first)[:1] == codec.V2 and len(first) < len(derived) / 2
    assert bytes(second) == other
    assert json.loads(other)
