"""What every store shares: mapping our records onto the eventsourcing recorders' rows."""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from typing import TypeVar
from uuid import UUID

from eventsourcing.persistence import (
    ApplicationRecorder,
    IntegrityError,
    OperationalError,
    StoredEvent,
)
from rulebound.engine.store import ConcurrencyConflict, Notification, Record, StoreError

log = logging.getLogger("rulebound.stores")
T = TypeVar("T")


class RecorderStore:
    """An EventStore over an eventsourcing ApplicationRecorder (one per backend).

    The recorder stores our bytes as they are: events are encoded by engine.codec with
    orjson and pydantic, not by the library's transcoder, so the store never needs to know
    our event classes.
    """

    blocking = True
    retry_for = 60.0  # seconds a lock timeout is retried before it becomes an error

    def __init__(self, recorder: ApplicationRecorder) -> None:
        self.recorder = recorder
        self._closed = False
        self._lock = threading.Lock()

    # --- events -------------------------------------------------------------------------

    def append(self, records: Sequence[Record]) -> None:
        if not records:
            return
        rows = [StoredEvent(originator_id=r.run_id, originator_version=r.seq, topic=r.topic,
                            state=r.data) for r in records]
        try:
            self._retrying(lambda: self.recorder.insert_events(rows))
        except IntegrityError:
            run_ids = sorted({r.run_id for r in records}, key=str)
            raise ConcurrencyConflict(
                "an event already exists at one of these positions; nothing was written",
                run_ids) from None

    def read(self, run_id: UUID, after: int = 0) -> list[Record]:
        rows = self._retrying(lambda: self.recorder.select_events(run_id, gt=after or None))
        return [Record(_uuid(r.originator_id), r.originator_version, r.topic, bytes(r.state))
                for r in rows]

    def read_all(self, after: int, limit: int, *, topics: Sequence[str] = (),
                 stop: int | None = None) -> list[Notification]:
        rows = self._retrying(lambda: self.recorder.select_notifications(
            after, limit, stop=stop, topics=list(topics), inclusive_of_start=False))
        return [Notification(n.id, Record(_uuid(n.originator_id), n.originator_version,
                                          n.topic, bytes(n.state))) for n in rows]

    def last_position(self) -> int:
        return self._retrying(self.recorder.max_notification_id) or 0

    # --- plumbing -----------------------------------------------------------------------

    def _is_transient(self, error: OperationalError) -> bool:
        return False

    def _retrying(self, call: Callable[[], T]) -> T:
        """Retry what the backend reports as a transient lock timeout, with jittered backoff."""
        deadline = time.monotonic() + self.retry_for
        delay = 0.01
        while True:
            try:
                return call()
            except OperationalError as exc:
                if not self._is_transient(exc) or time.monotonic() > deadline:
                    raise StoreError(f"store error: {_safe(exc)}") from None
                log.debug("store busy (%s); retrying in %.3fs", _safe(exc), delay)
                time.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 1.0)

    def close(self) -> None:
        self._closed = True


def _uuid(value: UUID | str) -> UUID:
    return value if isinstance(value, UUID) else UUID(str(value))


def _safe(exc: BaseException) -> str:
    """A database error's first line, which names the problem but carries no credentials."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:300]
