"""SQLite store (`sqlite:///path.db`, the embedded default): the library's recorder, in WAL
mode with full fsync per commit, plus a read model table in the same file.

The library's recorder does not retry a lock timeout ("database is locked" after its busy
timeout); several processes may share the file, so this adapter retries with backoff.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sqlite3
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from uuid import UUID

from eventsourcing.persistence import OperationalError, PersistenceError
from eventsourcing.sqlite import (
    SQLiteAggregateRecorder,
    SQLiteApplicationRecorder,
    SQLiteDatastore,
)
from rulebound.engine.store import RunChange, RunRow, Snapshot, StoreError, StoreInUse

from .base import KEEPER_ID, KEEPER_TOPIC, RecorderStore, _uuid

EVENTS = "rulebound_events"
RUNS = "rulebound_runs"
TRACKING = "rulebound_runs_position"
PARKED = "rulebound_parked"
SNAPSHOTS = "rulebound_snapshots"


class SQLiteStore(RecorderStore):
    def __init__(self, path: str | os.PathLike[str], *, lock_timeout: int = 5,
                 pool_size: int = 4) -> None:
        path = Path(path)
        if not path.parent.is_dir():
            raise StoreError(f"cannot open SQLite store {str(path)!r}: folder "
                             f"{str(path.parent)!r} does not exist")
        self.path = path
        self._writer_lock: int | None = None
        try:
            self.datastore = SQLiteDatastore(str(path), lock_timeout=lock_timeout,
                                             pool_size=pool_size, max_overflow=4,
                                             pool_timeout=30.0)
            recorder = SQLiteApplicationRecorder(self.datastore, events_table_name=EVENTS)
            super().__init__(recorder)
            self._retrying(recorder.create_table)
            self._retrying(self._create_read_model)
            # Snapshots: an aggregate recorder in a table of its own, as the library keeps
            # an application's snapshots (see engine.snapshots for what a row holds).
            self.snapshots = SQLiteAggregateRecorder(self.datastore,
                                                     events_table_name=SNAPSHOTS)
            self._retrying(self.snapshots.create_table)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open SQLite store {str(path)!r}: {exc}") from None

    def _is_busy(self, error: OperationalError) -> bool:
        text = str(error).lower()
        return "locked" in text or "busy" in text

    def _is_unavailable(self, error: PersistenceError) -> bool:
        """The file cannot be reached (I/O error, cannot open, no connection free in the
        pool): may pass. A missing table, a malformed file or a bad value will not."""
        if isinstance(error, TimeoutError):
            return True  # the library's ConnectionUnavailableError (pool timeout)
        text = str(error).lower()
        return isinstance(error, OperationalError) and (
            "disk i/o error" in text or "unable to open" in text)

    def _create_read_model(self) -> None:
        with self.datastore.transaction(commit=True) as c:
            c.execute(f"CREATE TABLE IF NOT EXISTS {RUNS} (run_id TEXT PRIMARY KEY, "
                      "workflow TEXT NOT NULL, status TEXT NOT NULL, version INTEGER NOT NULL, "
                      "created_at TEXT NOT NULL, updated_at TEXT NOT NULL)")
            c.execute(f"CREATE INDEX IF NOT EXISTS {RUNS}_status ON {RUNS} "
                      "(status, created_at)")
            c.execute(f"CREATE INDEX IF NOT EXISTS {RUNS}_workflow ON {RUNS} "
                      "(workflow, created_at)")
            c.execute(f"CREATE TABLE IF NOT EXISTS {TRACKING} (id INTEGER PRIMARY KEY "
                      "CHECK (id = 1), position INTEGER NOT NULL)")
            c.execute(f"CREATE TABLE IF NOT EXISTS {PARKED} (run_id TEXT PRIMARY KEY, "
                      "until REAL NOT NULL)")
            c.execute(f"CREATE INDEX IF NOT EXISTS {PARKED}_until ON {PARKED} (until)")

    # --- the read model ---------------------------------------------------------------

    def apply_run_changes(self, changes: Sequence[RunChange], position: int) -> None:
        def apply() -> None:
            with self.datastore.transaction(commit=True) as c:
                c.execute(f"SELECT position FROM {TRACKING} WHERE id = 1")
                row = c.fetchone()
                if row is not None and row[0] >= position:
                    return  # already applied (another process or a replay after a crash)
                for ch in changes:
                    if ch.workflow is not None:
                        c.execute(
                            f"INSERT INTO {RUNS} VALUES (?,?,?,?,?,?) ON CONFLICT(run_id) DO "
                            "UPDATE SET status = excluded.status, version = excluded.version, "
                            f"updated_at = excluded.updated_at WHERE {RUNS}.version < "
                            "excluded.version",
                            (ch.run_id.hex, ch.workflow, ch.status, ch.version,
                             ch.at.isoformat(), ch.at.isoformat()))
                    else:
                        c.execute(f"UPDATE {RUNS} SET status = ?, version = ?, updated_at = ? "
                                  "WHERE run_id = ? AND version < ?",
                                  (ch.status, ch.version, ch.at.isoformat(), ch.run_id.hex,
                                   ch.version))
                c.execute(f"INSERT INTO {TRACKING} VALUES (1, ?) ON CONFLICT(id) DO UPDATE "
                          "SET position = excluded.position", (position,))

        self._retrying(apply)

    def run_changes_position(self) -> int:
        def read() -> int:
            with self.datastore.transaction(commit=False) as c:
                c.execute(f"SELECT position FROM {TRACKING} WHERE id = 1")
                row = c.fetchone()
                return int(row[0]) if row else 0

        return self._retrying(read)

    def list_runs(self, *, status: str | None = None, workflow: str | None = None,
                  limit: int = 100, offset: int = 0) -> list[RunRow]:
        where, params = [], []
        if status is not None:
            where.append("status = ?")
            params.append(status)
        if workflow is not None:
            where.append("workflow = ?")
            params.append(workflow)
        sql = (f"SELECT * FROM {RUNS}" + (" WHERE " + " AND ".join(where) if where else "")
               + " ORDER BY created_at DESC, run_id DESC LIMIT ? OFFSET ?")

        def read() -> list[RunRow]:
            with self.datastore.transaction(commit=False) as c:
                c.execute(sql, (*params, limit, offset))
                return [RunRow(UUID(r["run_id"]), r["workflow"], r["status"], r["version"],
                               datetime.fromisoformat(r["created_at"]),
                               datetime.fromisoformat(r["updated_at"])) for r in c.fetchall()]

        return self._retrying(read)

    def count_runs(self) -> dict[str, int]:
        def read() -> dict[str, int]:
            with self.datastore.transaction(commit=False) as c:
                c.execute(f"SELECT status, COUNT(*) FROM {RUNS} GROUP BY status")
                return {row[0]: row[1] for row in c.fetchall()}

        return self._retrying(read)

    def claim_writer(self, worker: str) -> None:
        """Become this file's one writing engine, or StoreInUse naming the one that is.

        A lock on a file beside the database (`path.writer`), held until close and released
        by the OS if the process dies: a crashed engine never blocks the next. Readers (the
        CLI's runs, show, explain, export, verify) take no lock and work beside it.
        """
        if self._writer_lock is not None:
            return
        lock_path = f"{self.path}.writer"
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise StoreInUse(
                f"SQLite store {str(self.path)!r} is in use by another engine ({holder}); "
                "a SQLite file takes one writing engine (read-only commands work beside it; "
                "use PostgreSQL for several engines)") from None
        info = {"worker": worker, "pid": os.getpid(), "host": socket.gethostname(),
                "since": datetime.now().astimezone().isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._writer_lock = fd

    # --- parked runs: nothing to do until a signal or a far-off timer ---------------------

    def park(self, run_id: UUID, until: float, version: int | None = None) -> None:
        del version  # one engine per store: no other engine can leave a row stale
        def write() -> None:
            with self.datastore.transaction(commit=True) as c:
                c.execute(f"INSERT INTO {PARKED} VALUES (?, ?) ON CONFLICT(run_id) DO UPDATE "
                          "SET until = excluded.until", (run_id.hex, until))
        self._retrying(write)

    def unpark(self, run_id: UUID) -> None:
        def write() -> None:
            with self.datastore.transaction(commit=True) as c:
                c.execute(f"DELETE FROM {PARKED} WHERE run_id = ?", (run_id.hex,))
        self._retrying(write)

    def parked_due(self, until: float, limit: int = 1000) -> list[UUID]:
        def read() -> list[UUID]:
            with self.datastore.transaction(commit=False) as c:
                c.execute(f"SELECT run_id FROM {PARKED} WHERE until <= ? ORDER BY until "
                          "LIMIT ?", (until, limit))
                return [UUID(r[0]) for r in c.fetchall()]
        return self._retrying(read)

    def runs_to_recover(self, now: float, limit: int = 500, offset: int = 0) -> list[UUID]:
        def read() -> list[UUID]:
            with self.datastore.transaction(commit=False) as c:
                c.execute(f"SELECT r.run_id FROM {RUNS} AS r LEFT JOIN {PARKED} AS p ON "
                          "p.run_id = r.run_id WHERE r.status = 'running' AND (p.until IS "
                          "NULL OR p.until <= ?) ORDER BY r.created_at, r.run_id LIMIT ? "
                          "OFFSET ?", (now, limit, offset))
                return [UUID(r[0]) for r in c.fetchall()]
        return self._retrying(read)

    # --- retention and snapshots ------------------------------------------------------

    def delete_runs(self, runs: Mapping[UUID, int]) -> list[UUID]:
        """One transaction. SQLite hands a new row the largest rowid + 1, so removing the
        rows at the top of the table would let new events reuse positions a tailing reader
        has already passed; a keeper row (no run's, never returned by `read_all`) holds the
        top position in their place."""
        def delete() -> list[UUID]:
            removed: list[UUID] = []
            with self.datastore.transaction(commit=True) as c:
                c.execute(f"SELECT MAX(rowid) FROM {EVENTS}")
                top = c.fetchone()[0]
                for run_id, count in runs.items():
                    key = run_id.hex
                    c.execute(f"SELECT COUNT(*), MAX(originator_version) FROM {EVENTS} "
                              "WHERE originator_id = ?", (key,))
                    n, last = c.fetchone()
                    if n != count or last != count or not count:
                        continue
                    c.execute(f"DELETE FROM {EVENTS} WHERE originator_id = ?", (key,))
                    c.execute(f"DELETE FROM {RUNS} WHERE run_id = ?", (key,))
                    c.execute(f"DELETE FROM {SNAPSHOTS} WHERE originator_id = ?", (key,))
                    removed.append(run_id)
                if removed and top is not None:
                    c.execute(f"SELECT MAX(rowid) FROM {EVENTS}")
                    if (c.fetchone()[0] or 0) < top:
                        c.execute(f"INSERT INTO {EVENTS} (rowid, originator_id, "
                                  "originator_version, topic, state) VALUES (?,?,?,?,?)",
                                  (top, KEEPER_ID.hex, top, KEEPER_TOPIC, b""))
                    c.execute(f"DELETE FROM {EVENTS} WHERE originator_id = ? AND rowid < ?",
                              (KEEPER_ID.hex, top))
            return removed

        return self._retrying(delete)

    def read_snapshot(self, run_id: UUID) -> Snapshot | None:
        rows = self._retrying(lambda: self.snapshots.select_events(run_id, desc=True, limit=1))
        if not rows:
            return None
        return Snapshot(_uuid(rows[0].originator_id), rows[0].originator_version,
                        bytes(rows[0].state))

    def write_snapshot(self, snapshot: Snapshot) -> None:
        """Kept (in place of the run's other snapshots) only while the run's event at that
        version exists: a run removed meanwhile gets no orphan snapshot."""
        key = snapshot.run_id.hex

        def write() -> None:
            with self.datastore.transaction(commit=True) as c:
                c.execute(f"SELECT 1 FROM {EVENTS} WHERE originator_id = ? AND "
                          "originator_version = ?", (key, snapshot.version))
                if c.fetchone() is None:
                    return
                c.execute(f"DELETE FROM {SNAPSHOTS} WHERE originator_id = ?", (key,))
                c.execute(f"INSERT INTO {SNAPSHOTS} VALUES (?, ?, ?, ?)",
                          (key, snapshot.version, "RunState", snapshot.data))

        self._retrying(write)

    def close(self) -> None:
        if self._writer_lock is not None:
            os.close(self._writer_lock)  # releases the lock
            self._writer_lock = None
        if not self._closed:
            self.datastore.close()
        super().close()


def _holder(fd: int) -> str:
    """Who holds the writer lock, as its holder wrote it: pid, host, since when."""
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {info['pid']} on {info['host']} since {info['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"
