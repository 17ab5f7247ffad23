"""Keep the synchronous store off the event loop, and commit many runs' events together.

One writer thread owns every append. Commits requested in the same moment (by many runs)
are drained from its queue and written in ONE transaction (group commit); if that
transaction conflicts, each run's write is retried alone so one conflict does not fail its
neighbours. A write that fails for any other reason is ambiguous (it may have committed
before the error): it is settled by reading the stream back and comparing the bytes,
never by a blind retry. Reads go to a small pool of reader threads.

A store that declares `blocking = False` (the in-memory one) is called inline: a dict
insert does not stall the loop, and a thread hop would cost more than the work.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any, TypeVar
from uuid import UUID

import orjson

from .store import ConcurrencyConflict, EventStore, Notification, Record, RunChange, StoreError

log = logging.getLogger("rulebound.storage")
T = TypeVar("T")
_STOP = object()
_TERMINAL_STATUS = {"RunCompleted": "completed", "RunFailed": "failed",
                    "RunCancelled": "cancelled"}
STATUS_TOPICS = ("RunStarted", *_TERMINAL_STATUS)


class _Write:
    """One append waiting for the writer: its records, the caller's loop and future, and the
    outcome (None for success), which the writer hands back to the loop once per batch."""

    __slots__ = ("future", "loop", "outcome", "records", "settled")

    def __init__(self, records: Sequence[Record], loop: asyncio.AbstractEventLoop) -> None:
        self.records = records
        self.loop = loop
        self.future: asyncio.Future[None] = loop.create_future()
        self.outcome: BaseException | None = None
        self.settled = False


class StoreWorker:
    """Async access to an EventStore: group-committing writer thread plus reader threads."""

    def __init__(self, store: EventStore, *, readers: int = 2, max_batch: int = 512) -> None:
        self.store = store
        self.blocking = bool(getattr(store, "blocking", True))
        self.max_batch = max_batch
        self.commits = 0  # transactions written (observability and benchmarks)
        self.batched_writes = 0  # writes that shared a transaction with others
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._readers = ThreadPoolExecutor(readers, thread_name_prefix="rulebound-read")
        self._writer: threading.Thread | None = None
        self._closed = False

    def start(self) -> None:
        if self.blocking and self._writer is None:
            self._writer = threading.Thread(
                target=self._write_loop, name="rulebound-writer", daemon=True)
            self._writer.start()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._writer is not None:
            self._queue.put(_STOP)
            await asyncio.get_running_loop().run_in_executor(None, self._writer.join)
        self._readers.shutdown(wait=True)
        await asyncio.get_running_loop().run_in_executor(None, self.store.close)

    # --- writes ---------------------------------------------------------------------

    async def append(self, records: Sequence[Record]) -> None:
        """Durably append records of one run; raises ConcurrencyConflict or StoreError.

        If the caller is cancelled while the write is in flight, the write may still land;
        the caller must treat the run's tail as unknown and reload it.
        """
        if self._closed:
            raise StoreError("the store is closed")
        if not self.blocking:
            self.store.append(records)
            self.commits += 1
            return
        write = _Write(records, asyncio.get_running_loop())
        self._queue.put(write)
        await write.future

    async def barrier(self) -> None:
        """Return once every write handed over before this call has been settled."""
        if self._closed:
            raise StoreError("the store is closed")
        if not self.blocking:
            return  # inline writes are settled when append returns
        write = _Write((), asyncio.get_running_loop())
        self._queue.put(write)
        await write.future

    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            batch: list[_Write] = [item]
            stop = False
            while len(batch) < self.max_batch:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is _STOP:
                    stop = True
                    break
                batch.append(more)
            try:
                self._write_batch(batch)
            except Exception as exc:  # a bug here must not leave callers waiting forever
                log.exception("storage writer failed on a batch")
                for write in batch:
                    _settle(write, StoreError(f"write outcome unknown: {type(exc).__name__}"))
            _deliver(batch)
            if stop:
                return

    def _write_batch(self, batch: list[_Write]) -> None:
        if any(not w.records for w in batch):  # barriers: settled once those before them are
            for write in batch:
                if not write.records:
                    _settle(write, None)
            batch = [w for w in batch if w.records]
            if not batch:
                return
        records = [r for w in batch for r in w.records]
        try:
            self.store.append(records)
        except ConcurrencyConflict as exc:
            if len(batch) == 1:
                _settle(batch[0], exc)
                return
            # Find the writes whose first position is taken; the others still go in together.
            clean: list[_Write] = []
            for write in batch:
                first = write.records[0]
                try:
                    taken = bool(self.store.read(first.run_id, after=first.seq - 1))
                except Exception:
                    taken = False  # unknown: let it try again with the others
                if taken:
                    _settle(write, ConcurrencyConflict(
                        f"run {first.run_id} already has an event at {first.seq}",
                        [first.run_id]))
                else:
                    clean.append(write)
            if len(clean) == len(batch):  # could not tell which: fall back to one by one
                for write in batch:
                    self._write_batch([write])
            elif clean:
                self._write_batch(clean)
            return
        except Exception as exc:
            for write in batch:
                self._settle_ambiguous(write, exc)
            return
        self.commits += 1
        self.batched_writes += len(batch) - 1 if len(batch) > 1 else 0
        for write in batch:
            _settle(write, None)

    def _settle_ambiguous(self, write: _Write, error: Exception) -> None:
        """Did the failed transaction commit this write? Read back and compare the bytes."""
        first = write.records[0]
        try:
            stored = self.store.read(first.run_id, after=first.seq - 1)
        except Exception as read_error:
            log.error("cannot read back run %s after a failed write: %s", first.run_id,
                      type(read_error).__name__)
            _settle(write, StoreError(f"write outcome unknown: {type(error).__name__}: "
                                      f"{error}"))
            return
        ours = {r.seq: r.data for r in write.records}
        theirs = {r.seq: r.data for r in stored if r.seq in ours}
        if theirs and all(theirs.get(seq) == data for seq, data in ours.items()):
            _settle(write, None)  # it did commit: success
        elif theirs:
            _settle(write, ConcurrencyConflict(
                f"run {first.run_id} was written by someone else", [first.run_id]))
        else:
            try:  # it did not commit: now it is safe to try again, once, alone
                self.store.append(write.records)
            except Exception as retry_error:
                _settle(write, retry_error if isinstance(retry_error, StoreError) else
                        StoreError(f"{type(retry_error).__name__}: {retry_error}"))
                return
            _settle(write, None)

    # --- reads ----------------------------------------------------------------------

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a read-side store call on a reader thread (inline for non-blocking stores)."""
        if not self.blocking:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self._readers, fn, *args)

    async def read(self, run_id: UUID, after: int = 0) -> list[Record]:
        return await self.call(self.store.read, run_id, after)

    # --- the read model -------------------------------------------------------------

    async def project(self, batch: int = 2000,
                      progress: Callable[[int, int], None] | None = None) -> int:
        """Bring the runs table up to date with the log; returns the position reached.

        `progress(position, last)` is called after each batch (from a reader thread).
        """
        return await self.call(self._project_sync, batch, progress)

    def _project_sync(self, batch: int,
                      progress: Callable[[int, int], None] | None = None) -> int:
        position = self.store.run_changes_position()
        last = self.store.last_position()
        while position < last:
            # Only starts and ends change a run's row: let the store filter by topic.
            notes = self.store.read_all(position, batch, topics=STATUS_TOPICS, stop=last)
            changes = [c for n in notes if (c := run_change(n)) is not None]
            position = notes[-1].position if len(notes) == batch else last
            self.store.apply_run_changes(changes, position)
            if progress is not None:
                progress(position, last)
        return position


def run_change(note: Notification) -> RunChange | None:
    """The read-model change a stored event implies (only starts and ends change status)."""
    record = note.record
    if record.topic == "RunStarted":
        body = orjson.loads(record.data)["event"]
        return RunChange(run_id=record.run_id, status="running", version=record.seq,
                         at=_parse_at(body["at"]), workflow=body["workflow"])
    status = _TERMINAL_STATUS.get(record.topic)
    if status is None:
        return None
    body = orjson.loads(record.data)["event"]
    return RunChange(run_id=record.run_id, status=status, version=record.seq,
                     at=_parse_at(body["at"]))


def _parse_at(value: str) -> datetime:
    return datetime.fromisoformat(value)


def _settle(write: _Write, error: BaseException | None) -> None:
    """Record a write's outcome on the writer thread (the first outcome wins)."""
    if write.settled:
        return
    write.settled = True
    write.outcome = error


def _deliver(batch: list[_Write]) -> None:
    """Hand a batch's outcomes to the loops that wait for them: one thread-safe call per loop
    and batch, not one per write (each costs a wake-up of the loop and a lock round trip)."""
    by_loop: dict[asyncio.AbstractEventLoop, list[_Write]] = {}
    for write in batch:
        by_loop.setdefault(write.loop, []).append(write)
    for loop, writes in by_loop.items():
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting any more
            loop.call_soon_threadsafe(_resolve, writes)


def _resolve(writes: list[_Write]) -> None:
    for write in writes:
        if write.future.done():  # the waiting task was cancelled: the write may still land
            continue
        if write.outcome is None:
            write.future.set_result(None)
        else:
            write.future.set_exception(write.outcome)
