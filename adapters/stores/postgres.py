"""PostgreSQL store (`postgresql://user:pass@host:port/db?schema=...&lock_timeout=5`; also
`pool_size` and `connect_timeout`, the seconds to wait for a connection before a call fails
with StoreUnavailable; the library's recorder tries each call up to ten times).

The library's recorder serialises inserts with a table lock, so that notification ids are
handed out in commit order; without a lock timeout a stuck writer would block every other
one forever, hence a finite default. Notification ids may have gaps after rollbacks, which
is why positions are always read as "greater than".
"""

from __future__ import annotations

import threading
from collections.abc import Collection, Mapping, Sequence
from typing import Any
from urllib.parse import unquote, urlsplit
from uuid import UUID

from eventsourcing.persistence import InterfaceError, OperationalError, PersistenceError
from eventsourcing.postgres import (
    PostgresAggregateRecorder,
    PostgresApplicationRecorder,
    PostgresDatastore,
)
from psycopg.sql import SQL, Composable, Identifier
from rulebound.engine.store import (
    Fence,
    Fenced,
    LeaseState,
    Record,
    RunChange,
    RunRow,
    Snapshot,
    StoreError,
    StoreUnavailable,
)

from .base import RecorderStore, _safe, _uuid

EVENTS = "rulebound_events"
RUNS = "rulebound_runs"
TRACKING = "rulebound_runs_position"
LEASES = "rulebound_leases"
ENGINES = "rulebound_engines"
RATES = "rulebound_rate_windows"
PARKED = "rulebound_parked"


class _FencedError(Exception):
    """Raised inside an append's transaction when its fence no longer holds (rolls it back)."""

    def __init__(self, shards: list[int]) -> None:
        super().__init__(f"shards {shards} are no longer this engine's")
        self.shards = shards


class FencedRecorder(PostgresApplicationRecorder):
    """The library's recorder, with the lease check in the insert's own transaction.

    `_insert_events` runs in the same transaction as the inserts, before the table lock: the
    lease rows named by the fence are read FOR SHARE, so a takeover (which updates them)
    waits for this append to commit, and an append whose epoch was replaced is refused.
    """

    leases_table = ""

    def _insert_events(self, curs: Any, stored_events: Sequence[Any], **kwargs: Any) -> None:
        fence: Fence | None = kwargs.get("fence")
        if not fence:
            return
        stale = _stale_shards(curs, SQL(self.leases_table), fence)
        if stale:
            raise _FencedError(stale)


def _stale_shards(curs: Any, leases: Composable, fence: Fence) -> list[int]:
    """The fence's shards no longer held at its epochs, read in the caller's transaction.
    The lease rows are read FOR SHARE: a takeover (which updates them) waits for that
    transaction to commit, so nothing a former owner writes under a fence lands after it."""
    shards = [s for s, _ in fence.epochs]
    epochs = [e for _, e in fence.epochs]
    curs.execute(SQL(
        "SELECT l.shard FROM {} AS l JOIN unnest(%s::int[], %s::bigint[]) AS f(shard, "
        "epoch) ON l.shard = f.shard AND l.epoch = f.epoch AND l.owner = %s "
        "FOR SHARE OF l").format(leases), (shards, epochs, fence.owner))
    held = {row["shard"] for row in curs.fetchall()}
    return sorted(set(shards) - held)


SNAPSHOTS = "rulebound_snapshots"


# Composite-type adapters by (host, port, database, schema, type): psycopg caches the
# classes it builds for a type by the CompositeInfo object, without bound, so an info fetched
# anew by every datastore (every Engine opened) grew that cache for the process's life.
_TYPE_INFOS: dict[tuple[str, int, str, str, str], Any] = {}
_TYPE_INFOS_LOCK = threading.Lock()


class _Datastore(PostgresDatastore):
    """The library's datastore, sharing composite-type adapters per database and schema."""

    types_key: tuple[str, int, str] = ("", 0, "")

    def register_type_adapters(self) -> None:
        from psycopg.types.composite import CompositeInfo, register_composite

        names = [n for n in self.db_type_names if n not in self.psycopg_type_adapters]
        if not names:
            return
        with self.get_connection() as conn:
            for name in names:
                key = (*self.types_key, self.schema, name)
                with _TYPE_INFOS_LOCK:
                    info = _TYPE_INFOS.get(key)
                    if info is None:
                        info = CompositeInfo.fetch(conn, f"{self.schema}.{name}")
                        if info is None:
                            continue
                        _TYPE_INFOS[key] = info
                register_composite(info, conn)
                self.psycopg_type_adapters[name] = info
                self.psycopg_python_types[name] = info.python_type


class PostgresStore(RecorderStore):
    def __init__(self, *, dbname: str, host: str, port: int, user: str, password: str,
                 schema: str = "public", lock_timeout: int = 5, pool_size: int = 4,
                 connect_timeout: float = 3.0) -> None:
        _probe(host=host, port=port, dbname=dbname, user=user, password=password,
               timeout=connect_timeout)
        try:
            self.datastore = _Datastore(
                dbname, host, port, user, password, schema=schema, lock_timeout=lock_timeout,
                pool_size=pool_size, max_overflow=pool_size, connect_timeout=connect_timeout,
                idle_in_transaction_session_timeout=60.0)
            self.datastore.types_key = (host, port, dbname)  # before recorders register types
            # No pool_open_timeout: with it the library calls pool.wait() on every
            # connection, and psycopg-pool's wait() fails when two threads call it at once.
            recorder = FencedRecorder(self.datastore, events_table_name=EVENTS)
            super().__init__(recorder)
            self.schema = self.datastore.schema
            recorder.leases_table = f"{_quoted(self.schema)}.{_quoted(LEASES)}"
            with self.datastore.transaction(commit=True) as c:
                c.execute(SQL("CREATE SCHEMA IF NOT EXISTS {}").format(Identifier(self.schema)))
            self._retrying(recorder.create_table)
            self._retrying(self._create_read_model)
            self._retrying(self._create_lease_tables)
            self._listener: Any = None
            self._listen_lock = threading.Lock()
            self._connect_args: dict[str, Any] = {
                "host": host, "port": port, "dbname": dbname, "user": user,
                "password": password, "connect_timeout": max(2, int(connect_timeout))}

            # Snapshots: an aggregate recorder in a table of its own, as the library keeps
            # an application's snapshots (see engine.snapshots for what a row holds).
            self.snapshots = PostgresAggregateRecorder(self.datastore,
                                                       events_table_name=SNAPSHOTS)
            self._retrying(self.snapshots.create_table)
        except StoreError:
            raise
        except Exception as exc:  # connection refused, auth failed, ...: say so, no secrets
            message = f"cannot open PostgreSQL store {user}@{host}:{port}/{dbname}: {_safe(exc)}"
            if isinstance(exc, PersistenceError) and self._is_unavailable(exc):
                raise StoreUnavailable(message, self.retry_after) from None
            raise StoreError(message) from None

    @classmethod
    def from_url(cls, url: str, **options: Any) -> PostgresStore:
        parts = urlsplit(url)
        known = {"schema", "lock_timeout", "pool_size", "connect_timeout"}
        unknown = set(options) - known
        if unknown:
            raise StoreError(f"unknown PostgreSQL URL options {sorted(unknown)} "
                             f"(known: {sorted(known)})")
        try:
            kwargs: dict[str, Any] = {
                "dbname": unquote(parts.path.lstrip("/")) or "postgres",
                "host": parts.hostname or "localhost", "port": parts.port or 5432,
                "user": unquote(parts.username or "postgres"),
                "password": unquote(parts.password or ""),
            }
            if "schema" in options:
                kwargs["schema"] = options["schema"]
            if "lock_timeout" in options:
                kwargs["lock_timeout"] = int(options["lock_timeout"])
            if "pool_size" in options:
                kwargs["pool_size"] = int(options["pool_size"])
            if "connect_timeout" in options:
                kwargs["connect_timeout"] = float(options["connect_timeout"])
        except ValueError as exc:
            raise StoreError(f"invalid PostgreSQL URL option: {exc}") from None
        return cls(**kwargs)

    def _is_busy(self, error: OperationalError) -> bool:
        text = str(error).lower()
        return "lock timeout" in text or "could not obtain lock" in text or (
            "deadlock" in text)

    def _is_unavailable(self, error: PersistenceError) -> bool:
        """psycopg's OperationalError and InterfaceError (which the library re-raises as its
        own) are connection-level: refused, lost, server shutting down or restarting, pool
        timeout. Except what waiting cannot fix: a refused login or a missing database."""
        if not isinstance(error, (OperationalError, InterfaceError)):
            return False  # DataError, ProgrammingError, ...: the same call fails again
        state = getattr(error.__cause__, "sqlstate", None) or ""
        if state.startswith("28") or state == "3D000":
            return False
        text = str(error).lower()
        return not ("authentication failed" in text or (
            "database" in text and "does not exist" in text))

    def _table(self, name: str) -> Any:
        return SQL("{}.{}").format(Identifier(self.schema), Identifier(name))

    def _create_read_model(self) -> None:
        with self.datastore.transaction(commit=True) as c:
            c.execute(SQL("CREATE TABLE IF NOT EXISTS {} (run_id uuid PRIMARY KEY, "
                          "workflow text NOT NULL, status text NOT NULL, version bigint NOT "
                          "NULL, created_at timestamptz NOT NULL, updated_at timestamptz NOT "
                          "NULL)").format(self._table(RUNS)))
            c.execute(SQL("CREATE INDEX IF NOT EXISTS {} ON {} (status, created_at)").format(
                Identifier(f"{RUNS}_status"), self._table(RUNS)))
            c.execute(SQL("CREATE TABLE IF NOT EXISTS {} (id int PRIMARY KEY CHECK (id = 1), "
                          "position bigint NOT NULL)").format(self._table(TRACKING)))
            c.execute(SQL("CREATE TABLE IF NOT EXISTS {} (run_id uuid PRIMARY KEY, until "
                          "double precision NOT NULL, version bigint)").format(
                              self._table(PARKED)))
            # Stores made before parked rows said which version they parked (NULL: never
            # taken for stale).
            c.execute(SQL("ALTER TABLE {} ADD COLUMN IF NOT EXISTS version bigint").format(
                self._table(PARKED)))
            c.execute(SQL("CREATE INDEX IF NOT EXISTS {} ON {} (until)").format(
                Identifier(f"{PARKED}_until"), self._table(PARKED)))

    def apply_run_changes(self, changes: Sequence[RunChange], position: int) -> None:
        def apply() -> None:
            with self.datastore.transaction(commit=True) as c:
                c.execute(SQL("SELECT position FROM {} WHERE id = 1 FOR UPDATE").format(
                    self._table(TRACKING)))
                row = c.fetchone()
                if row is not None and row["position"] >= position:
                    return
                runs = self._table(RUNS)
                for ch in changes:
                    if ch.workflow is not None:
                        c.execute(SQL(
                            "INSERT INTO {0} VALUES (%s,%s,%s,%s,%s,%s) ON CONFLICT (run_id) "
                            "DO UPDATE SET status = excluded.status, version = "
                            "excluded.version, updated_at = excluded.updated_at WHERE "
                            "{0}.version < excluded.version").format(runs),
                            (ch.run_id, ch.workflow, ch.status, ch.version, ch.at, ch.at))
                    else:
                        c.execute(SQL("UPDATE {} SET status = %s, version = %s, updated_at = %s "
                                      "WHERE run_id = %s AND version < %s").format(runs),
                                  (ch.status, ch.version, ch.at, ch.run_id, ch.version))
                c.execute(SQL("INSERT INTO {} VALUES (1, %s) ON CONFLICT (id) DO UPDATE SET "
                              "position = excluded.position").format(self._table(TRACKING)),
                          (position,))

        self._retrying(apply)

    def run_changes_position(self) -> int:
        def read() -> int:
            with self.datastore.transaction(commit=False) as c:
                c.execute(SQL("SELECT position FROM {} WHERE id = 1").format(
                    self._table(TRACKING)))
                row = c.fetchone()
                return int(row["position"]) if row else 0

        return self._retrying(read)

    def list_runs(self, *, status: str | None = None, workflow: str | None = None,
                  limit: int = 100, offset: int = 0) -> list[RunRow]:
        where, params = [], []
        if status is not None:
            where.append(SQL("status = %s"))
            params.append(status)
        if workflow is not None:
            where.append(SQL("workflow = %s"))
            params.append(workflow)
        query = SQL("SELECT * FROM {}").format(self._table(RUNS))
        if where:
            query = query + SQL(" WHERE ") + SQL(" AND ").join(where)
        query = query + SQL(" ORDER BY created_at DESC, run_id DESC LIMIT %s OFFSET %s")

        def read() -> list[RunRow]:
            with self.datastore.transaction(commit=False) as c:
                c.execute(query, (*params, limit, offset))
                return [RunRow(r["run_id"] if isinstance(r["run_id"], UUID) else
                               UUID(str(r["run_id"])), r["workflow"], r["status"],
                               r["version"], r["created_at"], r["updated_at"])
                        for r in c.fetchall()]

        return self._retrying(read)

    def count_runs(self) -> dict[str, int]:
        def read() -> dict[str, int]:
            with self.datastore.transaction(commit=False) as c:
                c.execute(SQL("SELECT status, COUNT(*) AS n FROM {} GROUP BY status").format(
                    self._table(RUNS)))
                return {row["status"]: row["n"] for row in c.fetchall()}

        return self._retrying(read)


    # --- many engines: shard leases, fencing, the change feed -------------------------------

    shards = 64  # runs are owned by shard (the run id modulo this), one engine per shard

    def append(self, records: Sequence[Record], fence: Fence | None = None) -> None:
        """Append, refused inside the transaction (Fenced) if `fence` no longer holds."""
        try:
            super().append(records, fence=fence)
        except _FencedError as exc:
            raise Fenced(f"this engine no longer owns shards {exc.shards}: another engine "
                         "took them over; nothing was written", exc.shards) from None

    def _create_lease_tables(self) -> None:
        with self.datastore.transaction(commit=True) as c:
            c.execute(SQL("CREATE TABLE IF NOT EXISTS {} (shard int PRIMARY KEY, owner text, "
                          "epoch bigint NOT NULL DEFAULT 0, expires_at timestamptz NOT NULL "
                          "DEFAULT 'epoch')").format(self._table(LEASES)))
            c.execute(SQL("INSERT INTO {} (shard) SELECT generate_series(0, %s) ON CONFLICT "
                          "DO NOTHING").format(self._table(LEASES)), (self.shards - 1,))
            c.execute(SQL("CREATE TABLE IF NOT EXISTS {} (worker text PRIMARY KEY, seen_at "
                          "timestamptz NOT NULL)").format(self._table(ENGINES)))
            c.execute(SQL("CREATE TABLE IF NOT EXISTS {} (key text NOT NULL, window_start "
                          "double precision NOT NULL, requests int NOT NULL, tokens bigint NOT "
                          "NULL, PRIMARY KEY (key, window_start))").format(self._table(RATES)))

    def rate_claim(self, key: str, per: float, requests: int | None, tokens: int | None,
                   want: int) -> float:
        """Admit one request of `want` tokens to `key`'s window shared by every engine on
        this database: 0.0, or the seconds until the window that refused it ends.

        Fixed windows of `per` seconds on the database's clock, one round trip: the row of
        the current window is created or counted up only while it stays within the limits
        (so two windows back to back may pass twice the rate across their boundary; each
        engine's own sliding window still keeps its share even). Old windows are pruned.
        """
        rates = self._table(RATES)
        max_requests = requests if requests is not None else 2**31 - 1
        max_tokens = tokens if tokens is not None else 2**62
        want = min(want, max_tokens)

        def claim() -> float:
            with self.datastore.transaction(commit=True) as c:
                c.execute(SQL(
                    "WITH w AS (SELECT floor(extract(epoch FROM now()) / %(per)s) * %(per)s "
                    "AS start, extract(epoch FROM now()) AS now) "
                    "INSERT INTO {0} AS r (key, window_start, requests, tokens) "
                    "SELECT %(key)s, w.start, 1, %(want)s FROM w "
                    "ON CONFLICT (key, window_start) DO UPDATE SET requests = r.requests + 1, "
                    "tokens = r.tokens + excluded.tokens WHERE r.requests + 1 <= %(maxr)s AND "
                    "r.tokens + excluded.tokens <= %(maxt)s "
                    "RETURNING r.requests").format(rates),
                    {"per": per, "key": key, "want": want, "maxr": max_requests,
                     "maxt": max_tokens})
                if c.fetchone() is not None:
                    return 0.0
                c.execute(SQL("SELECT (floor(extract(epoch FROM now()) / %(per)s) + 1) * "
                              "%(per)s - extract(epoch FROM now()) AS wait").format(),
                          {"per": per})
                row = c.fetchone()
                c.execute(SQL("DELETE FROM {} WHERE key = %s AND window_start < "
                              "extract(epoch FROM now()) - 10 * %s").format(rates), (key, per))
                return max(0.001, float(row["wait"])) if row else per

        return self._retrying(claim)

    def lease_cycle(self, worker: str, lease_seconds: float, held: Mapping[int, int],
                    release: Collection[int] = (), *, leaving: bool = False) -> LeaseState:
        """One round trip of the lease protocol, timed by the database's clock.

        Say this engine is alive; renew the shards it holds (at the epoch it holds them);
        give up `release`; take the shards it should hold (an even share of the live
        engines', by their sorted names) that are free or whose lease ran out, each at a new
        epoch. `leaving`: give up everything and leave the membership.
        """
        leases, engines = self._table(LEASES), self._table(ENGINES)

        def cycle() -> LeaseState:
            with self.datastore.transaction(commit=True) as c:
                if leaving:
                    c.execute(SQL("DELETE FROM {} WHERE worker = %s").format(engines), (worker,))
                    c.execute(SQL("UPDATE {} SET owner = NULL, expires_at = now() WHERE "
                                  "owner = %s").format(leases), (worker,))
                    return LeaseState(held={}, wanted=frozenset(), engines=0)
                c.execute(SQL("INSERT INTO {} VALUES (%s, now()) ON CONFLICT (worker) DO "
                              "UPDATE SET seen_at = now()").format(engines), (worker,))
                c.execute(SQL("DELETE FROM {} WHERE seen_at < now() - make_interval(secs => "
                              "%s)").format(engines), (lease_seconds,))
                c.execute(SQL("SELECT worker FROM {} ORDER BY worker").format(engines))
                live = [row["worker"] for row in c.fetchall()]
                mine = live.index(worker)
                wanted = frozenset(s for s in range(self.shards) if s % len(live) == mine)
                if release:
                    c.execute(SQL("UPDATE {} SET owner = NULL, expires_at = now() WHERE "
                                  "owner = %s AND shard = ANY(%s)").format(leases),
                              (worker, list(release)))
                keep = {s: e for s, e in held.items() if s not in release}
                now_held: dict[int, int] = {}
                if keep:
                    c.execute(SQL(
                        "UPDATE {} AS l SET expires_at = now() + make_interval(secs => %s) "
                        "FROM unnest(%s::int[], %s::bigint[]) AS h(shard, epoch) WHERE "
                        "l.shard = h.shard AND l.epoch = h.epoch AND l.owner = %s "
                        "RETURNING l.shard, l.epoch").format(leases),
                        (lease_seconds, list(keep), list(keep.values()), worker))
                    now_held.update({row["shard"]: row["epoch"] for row in c.fetchall()})
                take = sorted(wanted - set(now_held) - set(release))
                if take:
                    # `owner = worker` too: a cycle of ours whose answer was lost may have
                    # taken a shard we do not know we hold; taken again at a new epoch, it
                    # is not left idle until that lease runs out.
                    c.execute(SQL(
                        "UPDATE {} SET owner = %s, epoch = epoch + 1, expires_at = now() + "
                        "make_interval(secs => %s) WHERE shard = ANY(%s) AND (owner IS NULL "
                        "OR expires_at < now() OR owner = %s) RETURNING shard, epoch").format(
                            leases),
                        (worker, lease_seconds, take, worker))
                    now_held.update({row["shard"]: row["epoch"] for row in c.fetchall()})
                return LeaseState(held=now_held, wanted=wanted, engines=len(live))

        return self._retrying(cycle)

    def wait_for_change(self, timeout: float) -> bool:
        """Block until an append is notified (LISTEN) or `timeout` passes: True when the
        caller should read what was appended, False when nothing was.

        Its own connection, opened on first use and reopened after an error. While it cannot
        listen, it waits `timeout` and answers True, so the caller polls once per timeout
        and misses nothing appended while it was not listening."""
        import time

        import psycopg

        with self._listen_lock:
            try:
                if self._listener is None or self._listener.closed:
                    conn = psycopg.connect(autocommit=True, **self._connect_args)
                    conn.execute(SQL("LISTEN {}").format(
                        Identifier(self.recorder.channel_name)))  # type: ignore[attr-defined]
                    self._listener = conn
                    return True  # anything appended before we listened is read now
                return any(True for _ in self._listener.notifies(timeout=timeout,
                                                                 stop_after=1))
            except (psycopg.Error, OSError):
                if self._listener is not None:
                    self._listener.close()
                self._listener = None
                time.sleep(timeout)
                return True

    # --- parked runs: nothing to do until a signal or a far-off timer ---------------------

    def park(self, run_id: UUID, until: float, version: int | None = None) -> None:
        """Park a run until `until`, as of its `version`: once its log has grown past that
        version the row is stale (something was appended and nobody unparked it), and
        `runs_to_recover` lists the run whatever the row's time (one index probe of the
        events per parked run in a listing)."""
        def write() -> None:
            with self.datastore.transaction(commit=True) as c:
                c.execute(SQL("INSERT INTO {} (run_id, until, version) VALUES (%s, %s, %s) "
                              "ON CONFLICT (run_id) DO UPDATE SET until = excluded.until, "
                              "version = excluded.version").format(self._table(PARKED)),
                          (run_id, until, version))
        self._retrying(write)

    def unpark(self, run_id: UUID, fence: Fence | None = None) -> None:
        """Remove the run's parking row; with a fence, only while the fence's shards are
        still held at its epochs (a former owner's late removal removes nothing)."""
        def write() -> None:
            with self.datastore.transaction(commit=True) as c:
                if fence is None:
                    c.execute(SQL("DELETE FROM {} WHERE run_id = %s").format(
                        self._table(PARKED)), (run_id,))
                    return
                # Fenced as an append is: a takeover waits for this delete to commit, so it
                # never lists the run as parked and then sees its row go.
                if not _stale_shards(c, self._table(LEASES), fence):
                    c.execute(SQL("DELETE FROM {} WHERE run_id = %s").format(
                        self._table(PARKED)), (run_id,))
        self._retrying(write)

    def wake_parked(self, run_id: UUID, now: float) -> None:
        """Make a parked run due (nothing if it is not parked): another engine appended a
        request to it, and whichever engine owns it then loads it at its next poll, even if
        the owner's change feed missed the append or its shard changed hands. Due from the
        start of time rather than at `now`, so a caller's clock ahead of the owner's does
        not delay it."""
        del now
        def write() -> None:
            with self.datastore.transaction(commit=True) as c:
                c.execute(SQL("UPDATE {} SET until = 0 WHERE run_id = %s AND until > 0")
                          .format(self._table(PARKED)), (run_id,))
        self._retrying(write)

    def parked_due(self, until: float, limit: int = 1000) -> list[UUID]:
        def read() -> list[UUID]:
            with self.datastore.transaction(commit=False) as c:
                c.execute(SQL("SELECT run_id FROM {} WHERE until <= %s ORDER BY until LIMIT "
                              "%s").format(self._table(PARKED)), (until, limit))
                return [_uuid(r["run_id"]) for r in c.fetchall()]
        return self._retrying(read)

    def runs_to_recover(self, now: float, limit: int = 500, offset: int = 0) -> list[UUID]:
        def read() -> list[UUID]:
            with self.datastore.transaction(commit=False) as c:
                # A parking row is stale once the run's log has grown past the version it
                # parked (something was appended and nobody unparked it): the run is listed.
                c.execute(SQL("SELECT r.run_id FROM {} AS r LEFT JOIN {} AS p ON p.run_id = "
                              "r.run_id WHERE r.status = 'running' AND (p.until IS NULL OR "
                              "p.until <= %s OR EXISTS (SELECT 1 FROM {} AS e WHERE "
                              "e.originator_id = r.run_id AND e.originator_version > "
                              "p.version)) ORDER BY r.created_at, r.run_id LIMIT %s OFFSET "
                              "%s").format(self._table(RUNS), self._table(PARKED),
                                           self._table(EVENTS)),
                          (now, limit, offset))
                return [_uuid(r["run_id"]) for r in c.fetchall()]
        return self._retrying(read)

    # --- retention and snapshots ------------------------------------------------------

    def delete_runs(self, runs: Mapping[UUID, int]) -> list[UUID]:
        """One transaction. Notification ids come from a sequence, never handed out twice,
        so removed events leave gaps (as rollbacks do)."""
        ids = list(runs)
        if not ids:
            return []
        events, snapshots = self._table(EVENTS), self._table(SNAPSHOTS)

        def delete() -> list[UUID]:
            with self.datastore.transaction(commit=True) as c:
                c.execute(SQL("SELECT originator_id, count(*) AS n, max(originator_version) "
                              "AS last FROM {} WHERE originator_id = ANY(%s) GROUP BY "
                              "originator_id").format(events), (ids,))
                removed = []
                for row in c.fetchall():
                    run_id = _uuid(row["originator_id"])
                    count = runs.get(run_id)
                    if count and row["n"] == count and row["last"] == count:
                        removed.append(run_id)
                if removed:
                    for table, column in ((events, "originator_id"), (self._table(RUNS),
                                          "run_id"), (snapshots, "originator_id")):
                        c.execute(SQL("DELETE FROM {} WHERE {} = ANY(%s)").format(
                            table, Identifier(column)), (removed,))
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
        version exists."""
        snapshots, events = self._table(SNAPSHOTS), self._table(EVENTS)
        run_id, version = snapshot.run_id, snapshot.version

        def write() -> None:
            with self.datastore.transaction(commit=True) as c:
                c.execute(SQL("SELECT 1 FROM {} WHERE originator_id = %s AND "
                              "originator_version = %s FOR SHARE").format(events),
                          (run_id, version))
                if c.fetchone() is None:
                    return
                c.execute(SQL("DELETE FROM {} WHERE originator_id = %s").format(snapshots),
                          (run_id,))
                c.execute(SQL("INSERT INTO {} (originator_id, originator_version, topic, state) "
                              "VALUES (%s, %s, 'RunState', %s) ON CONFLICT DO NOTHING").format(
                                  snapshots), (run_id, version, snapshot.data))

        self._retrying(write)

    def close(self) -> None:
        with self._listen_lock:
            if getattr(self, "_listener", None) is not None:
                self._listener.close()
                self._listener = None
        if not self._closed:
            self.datastore.close()
        RecorderStore.close(self)


def _quoted(name: str) -> str:
    """An SQL identifier, double-quoted."""
    return '"' + name.replace('"', '""') + '"'


def _probe(*, host: str, port: int, dbname: str, user: str, password: str,
           timeout: float) -> None:
    """One direct connection before the pool is built, so that an unreachable or refusing
    server is a StoreError within `timeout` seconds that names host:port and the cause (the
    pool would retry for its whole connect timeout and then report only that it gave up)."""
    import math

    import psycopg

    try:
        psycopg.connect(host=host, port=port, dbname=dbname, user=user, password=password,
                        connect_timeout=max(2, math.ceil(timeout))).close()  # libpq's floor: 2 s
    except psycopg.Error as exc:
        cause = _cause(exc)
        message = (f"cannot reach PostgreSQL at {host}:{port} (database {dbname!r}, "
                   f"user {user!r}): {cause}")
        refused_for_good = ("authentication failed" in cause or "does not exist" in cause
                            or "no password supplied" in cause)
        if isinstance(exc, psycopg.OperationalError) and not refused_for_good:
            raise StoreUnavailable(message) from None  # the server may come back: transient
        raise StoreError(message) from None


def _cause(exc: BaseException) -> str:
    """libpq's reason, without its 'connection to server at ... failed:' preamble (which
    repeats the address) and without its hint lines."""
    text = " ".join(str(exc).split("\n")[0].split()) or type(exc).__name__
    for marker in ("failed: ", "connection failed: "):
        if marker in text:
            text = text.rsplit(marker, 1)[1]
    return text[:300]
