"""The store port: what the engine needs from durable storage, and nothing more.

Implementations (adapters/stores) are synchronous, like the eventsourcing recorders they wrap;
the engine only calls them from its own store threads (see engine.storage), never on the
event loop. A run is one stream keyed by its UUID; `seq` is the 1-based position in it.
"""

from __future__ import annotations

from collections.abc import Sequence
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


class StoreError(RuleboundError):
    """The store failed for a reason other than a conflict."""


class ConcurrencyConflict(StoreError):
    """Some (run_id, seq) in an append already exists: nothing of that append was written."""

    def __init__(self, message: str, run_ids: Sequence[UUID] = ()) -> None:
        super().__init__(message)
        self.run_ids = list(run_ids)


class EventStore(Protocol):
    """Synchronous event store. Every method may be called from any engine store thread."""

    def append(self, records: Sequence[Record]) -> None:
        """Write records of one or many runs in ONE transaction, all or nothing.

        Raises ConcurrencyConflict if any (run_id, seq) exists already; transient lock
        timeouts are retried with backoff inside the adapter.
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

    def close(self) -> None:
        """Release connections. Idempotent."""
