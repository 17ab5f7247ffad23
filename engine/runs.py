"""The run table: which runs this engine drives, and how a run is loaded from the store.

Live runs are `LiveRun`s; ended runs keep only their final state, for a while; a run whose
log cannot be read or folded is quarantined (reported, never driven). The creator gate makes
sure one caller at a time creates or takes up a given run id.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import pickle
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from typing import Any
from uuid import UUID

import orjson
from rulebound.domain import events as ev
from rulebound.domain.errors import CorruptRun, RunNotFound
from rulebound.domain.state import RunState, evolve

from . import codec, snapshots
from .live import LiveRun
from .registry import Registry
from .storage import StoreWorker
from .store import Record, Snapshot, StoreUnavailable

log = logging.getLogger("rulebound.engine")


class RunTable:
    def __init__(self, registry: Registry, *, keep_finished: int,
                 keep_finished_for: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.registry = registry
        self.live: dict[UUID, LiveRun] = {}
        # Ended runs' final states, newest last: answers get/wait for a run that just ended
        # without a read. Bounded by count, and by age (keep_finished_for seconds) so that a
        # burst of runs does not hold its memory once the load is gone. Each is kept pickled:
        # one block of about 1.5 KB from the C allocator rather than a few dozen small
        # objects, which pinned the interpreter's 1 MiB arenas after the burst (a few
        # survivors per arena keep it all; see `final_state`).
        self.finished: OrderedDict[UUID, bytes] = OrderedDict()
        self._finished_at: dict[UUID, float] = {}
        self.quarantined: dict[UUID, CorruptRun] = {}
        self._keep_finished = keep_finished
        self.keep_finished_for = keep_finished_for
        self._clock = clock
        self._creating: dict[UUID, asyncio.Future[None]] = {}
        # Snapshots: a whole-run load folding this many events or more writes one (0: off).
        self.snapshot_every = snapshots.SNAPSHOT_EVERY

    def ended(self, run: LiveRun) -> None:
        """`run` ended: forget its live object, keep its final state for a while."""
        self.live.pop(run.run_id, None)
        self.keep(run.run_id, run.state)

    def keep(self, run_id: UUID, state: RunState) -> None:
        """Remember an ended run's final state (the oldest go past the count)."""
        if self._keep_finished <= 0:
            return
        self.finished[run_id] = pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL)
        self.finished.move_to_end(run_id)
        self._finished_at[run_id] = self._clock()
        while len(self.finished) > self._keep_finished:
            gone, _ = self.finished.popitem(last=False)
            self._finished_at.pop(gone, None)

    def final_state(self, run_id: UUID) -> RunState | None:
        """The kept final state of an ended run, or None if none is kept.

        Unpickled per ask (about 13 us for a three-step run, as long as pickling it took when
        it ended): only this process's own `keep` wrote these bytes.
        """
        data = self.finished.get(run_id)
        return None if data is None else pickle.loads(data)

    def expire(self) -> int:
        """Forget final states kept longer than keep_finished_for; how many went."""
        if self.keep_finished_for is None:
            return 0
        cutoff = self._clock() - self.keep_finished_for
        gone = 0
        while self.finished:
            oldest = next(iter(self.finished))
            if self._finished_at.get(oldest, cutoff) > cutoff:
                break
            del self.finished[oldest]
            self._finished_at.pop(oldest, None)
            gone += 1
        return gone

    def quarantine(self, run_id: UUID, problem: CorruptRun) -> None:
        self.quarantined[run_id] = problem
        self.live.pop(run_id, None)

    @contextlib.asynccontextmanager
    async def alone_with(self, run_id: UUID) -> AsyncIterator[None]:
        """Wait until nobody else is creating or taking up `run_id`, then keep others out."""
        while run_id in self._creating:
            await asyncio.shield(self._creating[run_id])
        settled: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._creating[run_id] = settled
        try:
            yield
        finally:
            del self._creating[run_id]
            settled.set_result(None)

    def busy(self, run_id: UUID) -> bool:
        """Someone is creating or taking up `run_id` right now (see alone_with)."""
        return run_id in self._creating

    async def load(self, storage: StoreWorker, run_id: UUID, after: int = 0,
                   state: RunState | None = None, last_hash: str = codec.GENESIS_HASH
                   ) -> tuple[RunState, str, list[ev.Event]]:
        """Fold the run's events after `after` onto `state` (on a reader thread).

        Returns the new state, the last hash and the events that were read, so a reload can
        hand them to followers. A log that cannot be folded quarantines the run.

        A whole run (no `after`, no `state`) starts from its newest snapshot when the store
        keeps them and the snapshot matches the log (engine.snapshots); the events returned
        are then those after it. A load that folded many events writes a new snapshot.
        """
        try:
            if after == 0 and state is None and self.snapshot_every:
                return await storage.call(_load_from_snapshot, storage, run_id,
                                          self.snapshot_every)
            return await storage.call(_load_sync, storage, run_id, after,
                                      state or RunState(), last_hash)
        except CorruptRun as exc:
            self.quarantine(run_id, exc)
            raise

    async def adopt(self, storage: StoreWorker, run_id: UUID) -> LiveRun | None:
        """Load a run from the store and drive it here if it is still going."""
        if run_id in self.live:
            return self.live[run_id]
        state, last_hash, _ = await self.load(storage, run_id)
        if run_id in self.live:  # adopted by someone else while we read
            return self.live[run_id]
        if state.terminal:
            self.keep(run_id, state)
            return None
        definition = self.registry.by_hash(state.definition_hash)
        run = LiveRun(run_id, definition, state, last_hash)
        run.reconcile = True
        if definition is None:
            run.held = held_reason(run_id, state)
            log.warning(run.held)
        self.live[run_id] = run
        return run


def _load_from_snapshot(storage: StoreWorker, run_id: UUID, every: int
                        ) -> tuple[RunState, str, list[ev.Event]]:
    """Load a whole run: from its newest snapshot if that matches the log, else from the
    first event; then write a snapshot if `every` or more events were folded."""
    store = storage.store
    state, last_hash, after = RunState(), codec.GENESIS_HASH, 0
    records = None
    snapshot = _read_snapshot(store, run_id)
    if snapshot is not None:
        decoded = snapshots.decode(snapshot.data)
        # the event at the snapshot's version must be there, with the hash it recorded
        tail = store.read(run_id, snapshot.version - 1) if decoded else []
        if decoded is not None and tail and tail[0].seq == snapshot.version and (
                _hash_of(tail[0].data) == decoded[1]):
            state, last_hash = decoded
            after, records = snapshot.version, tail[1:]
        else:
            log.info("run %s: its snapshot at event %d does not match the log; folding "
                     "from the start", run_id, snapshot.version)
    state, last_hash, events = _load_sync(storage, run_id, after, state, last_hash, records)
    if len(events) >= every and hasattr(store, "write_snapshot"):
        made = snapshots.encode(run_id, state.version, last_hash, state)
        if made is not None:
            try:
                store.write_snapshot(made)
            except Exception as exc:  # derived data: a failed write costs the next load time
                log.info("run %s: snapshot not written (%s)", run_id, type(exc).__name__)
    return state, last_hash, events


def _read_snapshot(store: Any, run_id: UUID) -> Snapshot | None:
    reader = getattr(store, "read_snapshot", None)
    if reader is None:
        return None
    try:
        snapshot: Snapshot | None = reader(run_id)
        return snapshot
    except StoreUnavailable:
        raise  # the log would not be readable either: say so, as a load would
    except Exception as exc:  # derived data: without it, the log is folded from the start
        log.info("run %s: snapshot unreadable (%s)", run_id, type(exc).__name__)
        return None


def _hash_of(data: bytes) -> str | None:
    try:
        head = orjson.loads(data).get("hash")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    return head if isinstance(head, str) else None


def _load_sync(storage: StoreWorker, run_id: UUID, after: int, state: RunState,
               last_hash: str, records: list[Record] | None = None
               ) -> tuple[RunState, str, list[ev.Event]]:
    """Read (unless given), decode and fold a run's events (CPU work stays off the loop)."""
    if records is None:
        records = storage.store.read(run_id, after)
    if not records and after == 0:
        raise RunNotFound(f"no run {run_id}")
    events = []
    for expected, record in enumerate(records, start=after + 1):
        if record.seq != expected:
            raise CorruptRun(run_id, f"event {expected} is missing", seq=expected)
        event = codec.decode(record.data, run_id=run_id, seq=record.seq)
        try:
            state = evolve(state, event)
        except Exception as exc:
            raise CorruptRun(run_id, f"cannot fold {event.type}: {exc}",
                             seq=record.seq) from exc
        last_hash = event.hash or last_hash
        events.append(event)
    return state, last_hash, events


def held_reason(run_id: UUID, state: RunState) -> str:
    """Why a going run cannot go on here: the version it started on is not registered."""
    return (f"run {run_id} is held: workflow {state.workflow!r} version "
            f"{state.definition_hash[:12]} is not registered; register that version to "
            "resume it (register(..., newest=False) keeps new runs on the current version)")
