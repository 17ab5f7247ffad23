"""What a store's errors mean, on real backends: a connection-like failure is StoreUnavailable
(transient, with a retry_after hint); a programming or data error is a plain StoreError; and
a PostgreSQL connection killed after its COMMIT, before the acknowledgement, is neither a
failure nor a conflict once the storage worker has read the stream back."""

from __future__ import annotations

import asyncio
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from uuid import UUID, uuid4

import psycopg
import pytest
from rulebound.adapters.stores import open_store
from rulebound.adapters.stores.sqlite import SQLiteStore
from rulebound.engine.storage import StoreWorker
from rulebound.engine.store import ConcurrencyConflict, Record, StoreError, StoreUnavailable

from tests.pgserver import PgServer


def recs(run: UUID, start: int = 1, n: int = 2) -> list[Record]:
    return [Record(run, s, "E", b'{"n":%d}' % s) for s in range(start, start + n)]


def test_a_lock_held_past_the_adapters_patience_is_store_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "locked.db"
    store = SQLiteStore(path, lock_timeout=1)
    store.retry_for = 0.5  # give up on the lock sooner than the default minute
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        other.execute("BEGIN EXCLUSIVE")
        with pytest.raises(StoreUnavailable) as caught:
            store.append(recs(uuid4()))
        assert caught.value.transient and caught.value.retry_after > 0
        assert "busy" in str(caught.value)
        other.execute("COMMIT")
        run = uuid4()
        store.append(recs(run))  # the lock is gone: the next append goes through
        assert store.read(run) == recs(run)
    finally:
        other.close()
        store.close()


def test_a_closed_store_is_not_transient(store_url: str) -> None:
    store = open_store(store_url)
    store.close()
    if not getattr(store, "blocking", True):
        return  # the in-memory store keeps answering from its dicts
    with pytest.raises(StoreError) as caught:
        store.append(recs(uuid4()))
    assert not isinstance(caught.value, StoreUnavailable)
    assert "closed" in str(caught.value)


@pytest.mark.postgres
def test_a_value_postgresql_refuses_is_a_store_error_not_transient(postgres_url: str) -> None:
    store = open_store(postgres_url)
    try:
        with pytest.raises(StoreError) as caught:  # text cannot hold NUL: a DataError
            store.append([Record(uuid4(), 1, "E\x00vil", b"{}")])
        assert not caught.value.transient
        assert not isinstance(caught.value, (StoreUnavailable, ConcurrencyConflict))
    finally:
        store.close()


@pytest.mark.postgres
def test_postgresql_that_does_not_answer_is_store_unavailable_without_the_password() -> None:
    with socket_nobody_listens_on() as port:
        began = time.monotonic()
        with pytest.raises(StoreUnavailable) as caught:
            open_store(f"postgresql://u:hunter2@127.0.0.1:{port}/db?connect_timeout=0.5")
    assert time.monotonic() - began < 30
    assert "hunter2" not in str(caught.value)
    assert caught.value.transient


@contextmanager
def socket_nobody_listens_on() -> Iterator[int]:
    """A port that is bound but never listens: connections to it are refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


# --- a real lost acknowledgement on PostgreSQL ------------------------------------------------

def _admin(server: PgServer, dbname: str) -> psycopg.Connection:
    return psycopg.connect(host="127.0.0.1", port=server.port, user="rulebound",
                           password=server.password, dbname=dbname, autocommit=True)


def _set_standby(admin: psycopg.Connection, names: str | None) -> None:
    if names is None:
        admin.execute("ALTER SYSTEM RESET synchronous_standby_names")
    else:
        admin.execute(f"ALTER SYSTEM SET synchronous_standby_names = '{names}'")
    admin.execute("SELECT pg_reload_conf()")
    want = names or ""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the reload reaches backends asynchronously
        row = admin.execute("SHOW synchronous_standby_names").fetchone()
        if row is not None and row[0] == want:
            return
        time.sleep(0.05)
    raise AssertionError("the server did not pick up synchronous_standby_names")


def _kill_when_committed(server: PgServer, dbname: str, done: threading.Event) -> list[int]:
    """With a synchronous standby named that never connects, a COMMIT is written locally and
    then waits for the standby's acknowledgement (wait event SyncRep). Terminating that
    backend then is exactly a lost acknowledgement: committed, and the client gets a
    connection error. Returns the pids it killed."""
    killed: list[int] = []
    with _admin(server, dbname) as admin:
        deadline = time.monotonic() + 20
        while not done.is_set() and time.monotonic() < deadline:
            rows = admin.execute(
                "SELECT pid FROM pg_stat_activity WHERE wait_event = 'SyncRep' "
                "AND datname = current_database()").fetchall()
            for (pid,) in rows:
                admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
                killed.append(pid)
            if killed:
                return killed
            time.sleep(0.01)
    return killed


@pytest.mark.postgres
async def test_a_connection_killed_after_commit_is_not_a_false_conflict(
    pg_server: PgServer, postgres_url: str,
) -> None:
    dbname = postgres_url.rsplit("/", 1)[1]
    store = open_store(postgres_url)
    worker = StoreWorker(store)
    worker.start()
    run = uuid4()
    admin = _admin(pg_server, dbname)
    try:
        await worker.append(recs(run, 1, 1))
        _set_standby(admin, "rulebound_test_no_such_standby")
        done = threading.Event()
        killer = asyncio.ensure_future(asyncio.to_thread(
            _kill_when_committed, pg_server, dbname, done))
        try:
            # The recorder retries after the connection error and meets its own rows:
            # IntegrityError, which the adapter reports as a conflict. Read back: ours.
            await asyncio.wait_for(worker.append(recs(run, 2, 2)), 30)
        finally:
            done.set()
            killed = await killer
        assert killed, "no COMMIT was caught waiting for its acknowledgement"
        _set_standby(admin, None)
        assert store.read(run) == recs(run, 1, 3)  # stored exactly once
        await worker.append(recs(run, 4, 1))  # and the run goes on
        assert [r.seq for r in store.read(run)] == [1, 2, 3, 4]
    finally:
        _set_standby(admin, None)
        admin.close()
        await worker.close()


@pytest.mark.postgres
def test_the_adapter_alone_reports_that_lost_acknowledgement_as_a_conflict(
    pg_server: PgServer, postgres_url: str,
) -> None:
    """Why the worker must read back: this is what the recorder says (a false conflict)."""
    dbname = postgres_url.rsplit("/", 1)[1]
    store = open_store(postgres_url)
    run = uuid4()
    admin = _admin(pg_server, dbname)
    try:
        _set_standby(admin, "rulebound_test_no_such_standby")
        done = threading.Event()
        killed: list[int] = []
        killer = threading.Thread(target=lambda: killed.extend(
            _kill_when_committed(pg_server, dbname, done)))
        killer.start()
        try:
            with pytest.raises(ConcurrencyConflict):
                store.append(recs(run))
        finally:
            done.set()
            killer.join()
        assert killed
        _set_standby(admin, None)
        assert store.read(run) == recs(run)  # although it was written, once
    finally:
        _set_standby(admin, None)
        admin.close()
        store.close()
