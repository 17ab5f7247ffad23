"""What every store shares: mapping our records onto the eventsourcing recorders' rows."""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import TypeVar
from uuid import UUID

from eventsourcing.persistence import (
    ApplicationRecorder,
    IntegrityError,
    InterfaceError,
    OperationalError,
    PersistenceError,
    StoredEvent,
)
from rulebound.engine.codec import V2, compact, expand
from rulebound.engine.store import (
    ConcurrencyConflict,
    Fence,
    Notification,
    Record,
    StoreError,
    StoreUnavailable,
)

log = logging.getLogger("rulebound.stores")
T = TypeVar("T")
# A row that keeps a removed event's position from being handed out again (SQLite reuses
# the largest rowid once its row is gone): no run's, never returned by `read_all`.
KEEPER_ID = UUID(int=0)
KEEPER_TOPIC = "rulebound:position-keeper"


class RecorderStore:
    """An EventStore over an eventsourcing ApplicationRecorder (one per backend).

    The recorder stores our bytes: events are encoded by engine.codec with orjson and
    pydantic, not by the library's transcoder, so the store never needs to know our event
    classes. A durable store (`compact_rows`) writes each v1 payload as a v2 row (about a
    quarter of the bytes; engine.codec describes both) and reads every row back as v1, so
    what the engine, audits and exports see is byte for byte what the engine wrote. That CPU
    is spent here, in the store's worker threads, not on the event loop.
    """

    blocking = True
    compact_rows = True  # the memory store keeps v1: nothing to save, no CPU to add
    retry_for = 60.0  # seconds a lock timeout is retried before it becomes StoreUnavailable
    retry_after = 1.0  # the hint StoreUnavailable carries

    def __init__(self, recorder: ApplicationRecorder) -> None:
        self.recorder = recorder
        self._closed = False
        self._lock = threading.Lock()

    # --- events -------------------------------------------------------------------------

    def append(self, records: Sequence[Record], fence: Fence | None = None) -> None:
        if not records:
            return
        rows = [StoredEvent(originator_id=r.run_id, originator_version=r.seq, topic=r.topic,
                            state=compact(r.data, r.run_id, r.seq) if self.compact_rows
                            else r.data) for r in records]
        extra = {"fence": fence} if fence is not None else {}
        try:
            self._retrying(lambda: self.recorder.insert_events(rows, **extra))
        except IntegrityError:
            run_ids = sorted({r.run_id for r in records}, key=str)
            raise ConcurrencyConflict(
                "an event already exists at one of these positions; nothing was written",
                run_ids) from None

    def read(self, run_id: UUID, after: int = 0) -> list[Record]:
        rows = self._retrying(lambda: self.recorder.select_events(run_id, gt=after or None))
        return [_record(_uuid(r.originator_id), r.originator_version, r.topic, r.state)
                for r in rows]

    def read_all(self, after: int, limit: int, *, topics: Sequence[str] = (),
                 stop: int | None = None) -> list[Notification]:
        found: list[Notification] = []
        while True:  # keeper rows are skipped, and what they took of `limit` read again
            want = limit - len(found)
            rows = self._retrying(partial(
                self.recorder.select_notifications, after, want, stop=stop,
                topics=list(topics), inclusive_of_start=False))
            found.extend(Notification(n.id, _record(_uuid(n.originator_id),
                                                    n.originator_version, n.topic, n.state))
                         for n in rows if n.topic != KEEPER_TOPIC)
            if len(rows) < want or len(found) >= limit:
                return found
            after = rows[-1].id

    def last_position(self) -> int:
        return self._retrying(self.recorder.max_notification_id) or 0

    # --- plumbing -----------------------------------------------------------------------

    def _is_busy(self, error: OperationalError) -> bool:
        """A lock timeout: retried here with backoff for up to `retry_for` seconds."""
        return False

    def _is_unavailable(self, error: PersistenceError) -> bool:
        """A connection-like error: the store may answer if asked again later."""
        return isinstance(error, InterfaceError)

    def _retrying(self, call: Callable[[], T]) -> T:
        """Call the recorder; retry lock timeouts with jittered backoff, and translate the
        library's errors into the port's: StoreUnavailable for what may pass (connection
        errors, a lock held too long), StoreError for the rest. IntegrityError passes
        through for `append` to report as a conflict."""
        if self._closed:
            raise StoreError("the store is closed")
        deadline = time.monotonic() + self.retry_for
        delay = 0.01
        while True:
            try:
                return call()
            except IntegrityError:
                raise
            except PersistenceError as exc:
                busy = isinstance(exc, OperationalError) and self._is_busy(exc)
                if busy and time.monotonic() <= deadline:
                    log.debug("store busy (%s); retrying in %.3fs", _safe(exc), delay)
                    time.sleep(delay * (0.5 + random.random()))
                    delay = min(delay * 2, 1.0)
                    continue
                if self._closed:
                    raise StoreError("the store is closed") from None
                if busy:
                    raise StoreUnavailable(
                        f"store busy for more than {self.retry_for:g}s: {_safe(exc)}",
                        self.retry_after) from None
                if self._is_unavailable(exc):
                    raise StoreUnavailable(f"store unavailable: {_safe(exc)}",
                                           self.retry_after) from None
                raise StoreError(f"store error ({type(exc).__name__}): {_safe(exc)}") from None

    def close(self) -> None:
        self._closed = True


def _record(run_id: UUID, seq: int, topic: str, state: bytes) -> Record:
    """A stored row as a Record carrying v1 bytes. A v2 row that does not inflate (edited in
    the store) is passed on as it is: decoding and verification report it at its place."""
    data = bytes(state)
    if data[:1] == V2:
        try:
            data = expand(data, run_id, seq)
        except ValueError as exc:
            log.warning("run %s: event %d is unreadable: %s", run_id, seq, exc)
    return Record(run_id, seq, topic, data)


def _uuid(value: UUID | str) -> UUID:
    return value if isinstance(value, UUID) else UUID(str(value))


def _safe(exc: BaseException) -> str:
    """A database error's first line, which names the problem but carries no credentials."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:300]
