"""The store port: what the engine needs from durable storage, and nothing more.

Implementations (adapters/stores) are synchronous, like the eventsourcing recorders they wrap;
the engine only calls them from its own store threads (see engine.storage), never on the
event loop. A run is one stream keyed by its UUID; `seq` is the 1-based position in it.

Errors a store raises, and what they mean to the caller:

- `ConcurrencyConflict`: an append met an existing (run_id, seq). From a store adapter this
  may be a *false* conflict: a recorder that retries an insert after a lost connection
  meets its own rows if the first try had committed. `engine.storage.StoreWorker` settles
  it by reading the stream back, so a conflict it reports is real.
- `StoreUnavailable` (transient, `retry_after` seconds is a hint): the store cannot be
  reached or stays busy: connection refused or lost, server restarting or shutting down,
  pool exhausted, a lock not obtained within the adapter's patience. Calling again later may
  succeed. An append that raised it may or may not have been written.
- `WriteOutcomeUnknown` (a `StoreUnavailable`): only from `StoreWorker`: an append failed
  and reading back to learn whether it landed failed too. Reload the run before deciding.
- any other `StoreError`: not transient. A programming or data error (bad SQL, a value the
  database refuses, a missing table), a closed store, a bad URL: the same call would fail
  the same way, so retrying it is pointless.

Messages never carry credentials: adapters report the first line of the driver's message
and the store by its URL without password.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import NamedTuple, Protocol
from uuid import UUID

from rulebound.domain.errors import RuleboundError


class Record(NamedTuple):
    """One stored event: its run, position, topic (the event type) and bytes (engine.codec).

    A named tuple rather than a frozen dataclass: the engine builds one per event on the hot
    path, and a tuple is built several times faster than a frozen dataclass instance.
    """

    run_id: UUID
    seq: int
    topic: str
    data: bytes


class Notification(NamedTuple):
    """A record with its position in the store-wide sequence (may have gaps on PostgreSQL)."""

    position: int
    record: Record


class Snapshot(NamedTuple):
    """A run's folded state at `version` (engine.snapshots encodes `data`): derived data that
    saves folding the first `version` events on a load, never the source of truth."""

    run_id: UUID
    version: int
    data: bytes


@dataclass(frozen=True, slots=True)
class RunRow:
    """A row of the read model: list runs by status and workflow without replaying streams."""

    run_id: UUID
    workflow: str
    status: str
    version: int
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class RunChange:
    """An update to the read model derived from one notification.

    `workflow` and `created_at` are set only for the RunStarted of a run (the row's insert);
    later changes update status, version and updated_at.
    """

    run_id: UUID
    status: str
    version: int
    at: datetime
    workflow: str | None = None


@dataclass(frozen=True, slots=True)
class Fence:
    """What an owner's append must still hold to be written: its shards at their epochs."""

    owner: str
    epochs: tuple[tuple[int, int], ...]  # (shard, epoch)


@dataclass(frozen=True, slots=True)
class LeaseState:
    """The outcome of one lease cycle: the shards held now (shard -> epoch), the shards
    this engine should hold (its share of the live engines'), and how many engines live."""

    held: dict[int, int]
    wanted: frozenset[int]
    engines: int


class StoreError(RuleboundError):
    """The store failed. Not transient unless it is a `StoreUnavailable`: see the module
    docstring for what each subclass means."""

    transient: bool = False


class StoreUnavailable(StoreError):
    """The store cannot be reached right now, or stays busy; try again after `retry_after`
    seconds (a hint, not a promise). Transient: connection errors and lock timeouts."""

    transient = True

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class WriteOutcomeUnknown(StoreUnavailable):
    """An append failed, and reading the stream back to settle it failed too: the records
    may or may not be stored. Reload the run (its tail is unknown) before writing again."""


class ConcurrencyConflict(StoreError):
    """Some (run_id, seq) in an append already exists: nothing of that append was written."""

    def __init__(self, message: str, run_ids: Sequence[UUID] = ()) -> None:
        super().__init__(message)
        self.run_ids = list(run_ids)


class Fenced(StoreError):
    """An append by an engine that no longer owns the runs' shards: refused in the write's
    own transaction, nothing written. Not transient: the run is another engine's now."""

    def __init__(self, message: str, shards: Sequence[int] = ()) -> None:
        super().__init__(message)
        self.shards = list(shards)


class StoreInUse(StoreError):
    """Another engine writes to this store, and this kind of store takes one writer only."""


class EventStore(Protocol):
    """Synchronous event store. Every method may be called from any engine store thread."""

    def append(self, records: Sequence[Record]) -> None:
        """Write records of one or many runs in ONE transaction, all or nothing.

        Raises ConcurrencyConflict if any (run_id, seq) exists already (possibly a false
        one after a lost acknowledgement: see the module docstring); StoreUnavailable if the
        store cannot be reached (the outcome is then unknown); StoreError for anything that
        retrying would not fix. Lock timeouts are retried with backoff inside the adapter
        first. A store with a `blocking = False` attribute is called on the event loop (it
        must never wait); otherwise only from store threads.
        """

    def read(self, run_id: UUID, after: int = 0) -> list[Record]:
        """The run's records with seq > after, in order (empty if the run does not exist)."""

    def read_all(self, after: int, limit: int, *, topics: Sequence[str] = (),
                 stop: int | None = None) -> list[Notification]:
        """Records of all runs with after < position <= stop, in position order, at most
        `limit`, only of the given topics when some are given."""

    def last_position(self) -> int:
        """The largest position written so far (0 when empty)."""

    def apply_run_changes(self, changes: Sequence[RunChange], position: int) -> None:
        """Apply read-model changes and record `position` as processed, in one transaction."""

    def run_changes_position(self) -> int:
        """The last position the read model has processed (0 initially)."""

    def list_runs(
        self,
        *,
        status: str | None = None,
        workflow: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[RunRow]:
        """Read-model rows, newest first, filtered by status and workflow."""

    def count_runs(self) -> dict[str, int]:
        """How many runs there are per status."""

    def delete_runs(self, runs: Mapping[UUID, int]) -> list[UUID]:
        """Remove runs for good, in one transaction: their events, read-model row and
        snapshots. `runs` maps each run to the number of events the caller has secured
        (exported and verified): a run whose stored log does not end exactly there (it
        grew, or is gone already) is left as it is. Returns the runs removed.

        Store-wide positions of the removed events are never handed out again (tailing
        readers use "greater than"), so removing leaves gaps, as a rollback does; but
        `last_position` may be lower afterwards if the newest events were removed.
        """

    # Optional (a store without them is loaded by folding every event): snapshots.

    def read_snapshot(self, run_id: UUID) -> Snapshot | None:
        """The run's newest snapshot, or None."""

    def write_snapshot(self, snapshot: Snapshot) -> None:
        """Keep `snapshot` as the run's one snapshot, in place of any other (a loader writes
        one after finding the old one stale or unusable), unless the run has no event at
        its version (removed meanwhile, or a bogus version): then it is ignored."""

    def close(self) -> None:
        """Release connections. Idempotent."""
