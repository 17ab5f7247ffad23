"""Keep the synchronous store off the event loop, and commit many runs' events together.

One writer thread owns every append. Commits requested in the same moment (by many runs)
are drained from its queue and written in ONE transaction (group commit).

Every failed append is ambiguous until proven otherwise: a lost acknowledgement raises
although the transaction committed, and a recorder that retries an insert after a lost
connection (the eventsourcing PostgreSQL recorder does) then meets its own rows and reports
an integrity error, i.e. a *false* ConcurrencyConflict. So whatever the error, each write of
the failed transaction is settled by reading its stream back and comparing the stored bytes
with the bytes sent (every event carries a unique id, so identical bytes mean it was ours):

- identical: it committed; success.
- different (or only part of it there): another writer took the place; ConcurrencyConflict.
- absent: it did not commit. After a conflict that belongs to a neighbour in the batch, or a
  non-transient error that may be one neighbour's bad data, the absent writes are written
  again (together, or one by one to isolate the culprit). After a transient error they are
  reported as StoreUnavailable: known not written, safe to retry after `retry_after`.
- unreadable (the read-back failed too): WriteOutcomeUnknown; reload before writing again.

A store that declares `blocking = False` (the in-memory one) is called inline: a dict
insert does not stall the loop, and a thread hop would cost more than the work. Inline
writes are settled by the same rules.
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

from .store import (
    ConcurrencyConflict,
    EventStore,
    Fence,
    Fenced,
    Notification,
    Record,
    RunChange,
    StoreError,
    StoreUnavailable,
    WriteOutcomeUnknown,
)

log = logging.getLogger("rulebound.storage")
T = TypeVar("T")
_STOP = object()
_LOOP_SLICE = 128  # status changes a store called on the loop projects between two yields
_RESOLVE_SLICE = 32  # finished writes whose callers resume in one loop iteration
_TERMINAL_STATUS = {"RunCompleted": "completed", "RunFailed": "failed",
                    "RunCancelled": "cancelled"}
STATUS_TOPICS = ("RunStarted", *_TERMINAL_STATUS)


_OURS, _THEIRS, _ABSENT = "ours", "theirs", "absent"


class _Write:
    """One append waiting for the writer: its records, the caller's loop and future, and the
    outcome (None for success), which the writer hands back to the loop once per batch.
    An inline write (non-blocking store) has no loop and no future."""

    __slots__ = ("fence", "future", "loop", "outcome", "records", "settled")

    def __init__(self, records: Sequence[Record],
                 loop: asyncio.AbstractEventLoop | None, fence: Fence | None = None) -> None:
        self.records = records
        self.fence = fence
        self.loop = loop
        self.future: asyncio.Future[None] | None = (
            loop.create_future() if loop is not None else None)
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
        self.fenced = 0  # writes refused because their fence no longer held
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._readers = ThreadPoolExecutor(readers, thread_name_prefix="rulebound-read")
        self._writer: threading.Thread | None = None
        self._closed = False

    def start(self) -> None:
        if self.blocking and self._writer is None:
            self._writer = threading.Thread(
                target=self._write_loop, name="rulebound-writer", daemon=True)
            self._writer.start()

    async def close(self, *, close_store: bool = True) -> None:
        """Stop the threads (after the writes already handed over), then close the store."""
        if self._closed:
            return
        self._closed = True
        if self._writer is not None:
            self._queue.put(_STOP)
            await asyncio.get_running_loop().run_in_executor(None, self._writer.join)
        self._readers.shutdown(wait=True)
        if close_store:
            await asyncio.get_running_loop().run_in_executor(None, self.store.close)

    # --- writes ---------------------------------------------------------------------

    async def append(self, records: Sequence[Record], fence: Fence | None = None) -> None:
        """Durably append records of one run.

        Raises ConcurrencyConflict (real: another writer's events are stored there),
        StoreUnavailable (transient; these records are known not to be stored),
        WriteOutcomeUnknown (transient; they may be stored: reload before writing again) or
        StoreError (not transient), or Fenced (`fence` no longer holds: nothing written).
        If the caller is cancelled while the write is in flight, the write may still land;
        the caller must treat the run's tail as unknown.
        """
        if self._closed:
            raise StoreError("the store is closed")
        if not self.blocking:
            try:
                self._append(records, fence)
            except Fenced:
                raise
            except Exception as exc:
                write = _Write(records, None, fence)
                self._recover([write], exc)
                if write.outcome is not None:
                    raise write.outcome from None
                return
            self.commits += 1
            return
        write = _Write(records, asyncio.get_running_loop(), fence)
        self._queue.put(write)
        assert write.future is not None
        await write.future

    def _append(self, records: Sequence[Record], fence: Fence | None) -> None:
        if fence is None:
            self.store.append(records)
        else:  # only stores that lease shards take a fence
            self.store.append(records, fence=fence)  # type: ignore[call-arg]

    async def barrier(self) -> None:
        """Return once every write handed over before this call has been settled."""
        if self._closed:
            raise StoreError("the store is closed")
        if not self.blocking:
            return  # inline writes are settled when append returns
        write = _Write((), asyncio.get_running_loop())
        self._queue.put(write)
        assert write.future is not None
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
                    _settle(write, WriteOutcomeUnknown(
                        f"write outcome unknown: the storage writer failed "
                        f"({type(exc).__name__})"))
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
        self._try(batch)

    def _try(self, writes: list[_Write]) -> None:
        """Append these writes in one transaction; settle any failure by reading back."""
        records = writes[0].records if len(writes) == 1 else [
            r for w in writes for r in w.records]
        try:
            self._append(records, _merged(writes))
        except Fenced as exc:  # definite, nothing written: only the stale shards' writes fail
            if len(writes) == 1:
                self.fenced += 1
                _settle(writes[0], exc)
            else:
                for write in writes:
                    self._try([write])
            return
        except Exception as exc:
            self._recover(writes, exc)
            return
        self.commits += 1
        self.batched_writes += len(writes) - 1
        for write in writes:
            _settle(write, None)

    def _recover(self, writes: list[_Write], error: Exception) -> None:
        """A transaction holding these writes failed with `error`: find out, write by write,
        whether it landed (see the module docstring for the rules)."""
        absent: list[_Write] = []
        unreadable: Exception | None = None
        landed = 0
        for write in writes:
            if unreadable is not None:  # the store does not answer: do not ask it 500 times
                _settle(write, _unknown(write, error, unreadable))
                continue
            try:
                verdict = self._compare(write.records)
            except Exception as read_error:
                log.warning("cannot read back run %s after a failed write: %s",
                            write.records[0].run_id, type(read_error).__name__)
                unreadable = read_error
                _settle(write, _unknown(write, error, read_error))
                continue
            if verdict is _OURS:
                if not isinstance(error, ConcurrencyConflict):
                    log.info("run %s: a write reported %s had committed (lost "
                             "acknowledgement)", write.records[0].run_id,
                             type(error).__name__)
                landed += 1
                _settle(write, None)
            elif verdict is _THEIRS:
                first = write.records[0]
                _settle(write, ConcurrencyConflict(
                    f"run {first.run_id} already has other events from position {first.seq}: "
                    "another writer got there first", [first.run_id]))
            else:
                absent.append(write)
        if landed:  # the transaction did commit, with these writes in it
            self.commits += 1
            self.batched_writes += landed - 1
        if not absent:
            return
        if isinstance(error, ConcurrencyConflict):
            if len(absent) < len(writes):
                self._try(absent)  # the conflict was a neighbour's: the rest go in together
            elif len(absent) > 1:
                for write in absent:  # could not tell whose: one by one
                    self._try([write])
            else:  # a conflict, yet nothing of ours is there: the store changed under us
                _settle(absent[0], ConcurrencyConflict(
                    f"run {absent[0].records[0].run_id}: the store reported a conflict but "
                    "holds none of these positions", [absent[0].records[0].run_id]))
        elif _transient(error) or len(absent) == 1:
            for write in absent:  # known not written: the caller may retry, later
                _settle(write, _not_written(write, error))
        else:  # perhaps one write's bad data failed them all: isolate it
            for write in absent:
                self._try([write])

    def _compare(self, records: Sequence[Record]) -> str:
        """Are these records stored exactly as sent (ours), stored differently or in part
        (theirs), or not stored at all (absent)?"""
        wanted: dict[UUID, dict[int, bytes]] = {}
        for record in records:
            wanted.setdefault(record.run_id, {})[record.seq] = record.data
        same = different = missing = 0
        for run_id, ours in wanted.items():
            stored = {r.seq: r.data for r in self.store.read(run_id, after=min(ours) - 1)}
            for seq, data in ours.items():
                found = stored.get(seq)
                if found is None:
                    missing += 1
                elif found == data:
                    same += 1
                else:
                    different += 1
        if different == 0 and missing == 0:
            return _OURS
        if different == 0 and same == 0:
            return _ABSENT
        return _THEIRS

    # --- reads ----------------------------------------------------------------------

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a read-side store call on a reader thread (inline for non-blocking stores)."""
        if self._closed:
            raise StoreError("the store is closed")
        if not self.blocking:
            return fn(*args)
        try:
            future = asyncio.get_running_loop().run_in_executor(self._readers, fn, *args)
        except RuntimeError:  # the reader threads stopped between the check and now
            raise StoreError("the store is closed") from None
        return await future

    async def read(self, run_id: UUID, after: int = 0) -> list[Record]:
        return await self.call(self.store.read, run_id, after)

    # --- the read model -------------------------------------------------------------

    async def project(self, batch: int = 2000,
                      progress: Callable[[int, int], None] | None = None) -> int:
        """Bring the runs table up to date with the log; returns the position reached.

        `progress(position, last)` is called after each batch (from a reader thread).
        A store called on the loop (memory) is projected a slice at a time, the loop getting
        its turn between slices: 10,000 runs that started together took one 350 ms iteration.
        """
        if self.blocking:
            return await self.call(self._project_sync, batch, progress)
        if self._closed:
            raise StoreError("the store is closed")
        last = self.store.last_position()
        while True:
            position = self._project_batch(min(batch, _LOOP_SLICE), last, progress)
            if position >= last:
                return position
            await asyncio.sleep(0)

    def _project_sync(self, batch: int,
                      progress: Callable[[int, int], None] | None = None) -> int:
        last = self.store.last_position()
        while (position := self._project_batch(batch, last, progress)) < last:
            pass
        return position

    def _project_batch(self, batch: int, last: int,
                       progress: Callable[[int, int], None] | None) -> int:
        """Project up to `batch` status changes towards `last`; the position reached."""
        position = self.store.run_changes_position()
        if position >= last:
            return position
        # Only starts and ends change a run's row: let the store filter by topic.
        notes = self.store.read_all(position, batch, topics=STATUS_TOPICS, stop=last)
        changes = [c for n in notes if (c := run_change(n)) is not None]
        position = notes[-1].position if len(notes) == batch else last
        self.store.apply_run_changes(changes, position)
        if progress is not None:
            progress(position, last)
        return position


def _merged(writes: list[_Write]) -> Fence | None:
    """One fence for writes that share a transaction (one engine: one owner)."""
    fences = [w.fence for w in writes if w.fence is not None]
    if not fences:
        return None
    if len(fences) == 1:
        return fences[0]
    return Fence(fences[0].owner, tuple(sorted({e for f in fences for e in f.epochs})))


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


def _transient(error: BaseException) -> bool:
    """May the same call succeed later? StoreUnavailable, and a foreign store's OSError."""
    return bool(getattr(error, "transient", False)) or isinstance(error, OSError)


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def _not_written(write: _Write, error: Exception) -> StoreError:
    """A failed write that reading back shows was not stored (one error per caller)."""
    first = write.records[0]
    message = f"run {first.run_id}: not written ({_describe(error)})"
    if _transient(error):
        return StoreUnavailable(message + "; safe to retry",
                                getattr(error, "retry_after", 1.0))
    return StoreError(message)


def _unknown(write: _Write, error: Exception, read_error: Exception) -> WriteOutcomeUnknown:
    first = write.records[0]
    return WriteOutcomeUnknown(
        f"run {first.run_id}: write outcome unknown ({_describe(error)}), and reading it back "
        f"failed too ({_describe(read_error)}); reload the run before writing again",
        getattr(read_error, "retry_after", 1.0))


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
        if write.loop is not None:
            by_loop.setdefault(write.loop, []).append(write)
    for loop, writes in by_loop.items():
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting any more
            loop.call_soon_threadsafe(_resolve, writes)


def _resolve(writes: list[_Write]) -> None:
    """Settle the writes' futures on their loop, _RESOLVE_SLICE per loop iteration.

    Each future set here resumes its task in the next iteration, which then finishes its
    commit (and may end its run and wake that run's waiters). A group commit of 500 writes
    settled at once made one iteration of 20-40 ms; in slices, timers and sockets get their
    turn between them, as commits take turns on the way in (engine/turns.py).
    """
    if len(writes) > _RESOLVE_SLICE:
        asyncio.get_running_loop().call_soon(_resolve, writes[_RESOLVE_SLICE:])
        writes = writes[:_RESOLVE_SLICE]
    for write in writes:
        assert write.future is not None
        if write.future.done():  # the waiting task was cancelled: the write may still land
            continue
        if write.outcome is None:
            write.future.set_result(None)
        else:
            write.future.set_exception(write.outcome)
