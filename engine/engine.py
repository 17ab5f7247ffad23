"""The Engine: an asyncio runtime that appends facts, asks the decider, and runs executors.

The path of a run reads straight: a request or an executor result becomes an event; the
engine folds it into the run's state, asks `advance` for the decisions, claims a dispatch
slot for every attempt that is due (its AttemptStarted goes into the SAME write, so the
start is durable before the executor is called), appends the whole batch, and only then
launches the executors. Every run has a lock; runs never wait for each other, and the
writes of many runs in the same moment share one transaction (engine.storage).

`Engine` keeps the lifecycle and the public facade; the parts it is made of each have one
job: the run table (runs.py), turns (turns.py), dispatch (dispatch.py), timers (timers.py)
and the feed of waiters and watchers (feed.py). The commit path and reconciliation live
here, because they are what ties those parts together:

- A request, once handed to the engine, is finished by the engine: `start`, `signal` and
  `cancel` run as tasks the engine owns and the caller awaits them shielded, so a caller
  cancelled after its write was handed to the store never leaves a half-applied commit (the
  write landed but its attempts never launched).
- Reconciliation is one path: whenever a run is loaded or reloaded, attempts the log shows
  as running with no task here are abandoned and decided again, its timer is re-armed, and
  its followers are fed the events the reload found.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import logging
import os
import secrets
import socket
import time
from collections.abc import AsyncGenerator, AsyncIterator, Coroutine, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any, TypeVar
from uuid import UUID, uuid4, uuid5

from rulebound.domain import events as ev
from rulebound.domain.decider import advance, build_input
from rulebound.domain.decider import timers as due_timers
from rulebound.domain.definitions import WaitForSignal, Workflow
from rulebound.domain.errors import CorruptRun, DefinitionError, RunNotFound
from rulebound.domain.explain import explain as explain_events
from rulebound.domain.state import RunState, evolve

from . import codec
from .clock import Clock, SystemClock
from .dispatch import Claim, Dispatcher, short, validate
from .errors import (
    EngineClosed,
    IdempotencyConflict,
    InvalidInput,
    Overloaded,
    RunTerminal,
)
from .executor import ExecutorContext, Task
from .feed import ENGINE_CLOSED as _ENGINE_CLOSED
from .feed import RUN_RETIRED as _RUN_RETIRED
from .feed import Feed
from .live import LiveRun
from .metrics import EngineMetrics
from .ownership import Ownership
from .ratelimit import RateLimit
from .registry import Registry
from .retention import Retainer, Retention
from .runs import RunTable, held_reason
from .storage import StoreWorker
from .store import ConcurrencyConflict, EventStore, Fenced, Record, RunRow, StoreError
from .stores import open_store
from .timers import Timers
from .tracing import TRACEPARENT
from .turns import Turns
from .views import RunView

log = logging.getLogger("rulebound.engine")
RUN_NAMESPACE = UUID("5b1f0c3e-7a53-4f0e-9d7c-2f1d8d6a9e11")
_REPLACED_RETRIES = 3  # signal/cancel: how often to follow a run whose object was replaced
_COPY_IDLE = 5.0  # seconds unused before a copy of another engine's run is let go
_RESULT_BACKOFF_MAX = 5.0  # seconds between tries of a result write while the store is down
T = TypeVar("T")


class EngineState(enum.Enum):
    NEW = "new"  # built, never opened (or a failed open was undone)
    OPENING = "opening"  # open() is connecting and recovering
    OPEN = "open"  # running: requests are taken
    CLOSING = "closing"  # close() is draining: no new attempts, no new requests
    CLOSED = "closed"  # closed; open() again to reuse


class Engine:
    """Run workflows durably. Use as `async with Engine(...) as engine:`.

    store: a URL (`memory://`, `sqlite:///path.db`, `postgresql://...`) or an EventStore.
    workflows / executors: what to run (or pass a `registry`); an executor is any async
      callable taking a `Task` (a plain `async def f(input)` too, see Registry).
    max_concurrency: attempts executing at once across all runs.
    max_active_runs: runs in flight before `start` answers Overloaded (backpressure).
    rate_limits: per executor name, requests and tokens per window; attempts wait for it.
    drain_timeout: on exit, how long running attempts may finish before being cancelled
      (a cancelled attempt is marked abandoned and run again by the next engine start,
      without using one of the step's retries).
    read_only: inspect a store (get, events, explain, runs) without running anything: no
      recovery, no executors needed; start, signal and cancel are refused.
    park_after: a run with nothing to do for at least this many seconds (a signal wait, a
      long backoff, a far-off timer) and nobody waiting on it here leaves memory; it is
      loaded again when a signal or a request comes, or its time is due (None: never).
    lease_time: on a store shared by several engines (PostgreSQL), the seconds a shard lease
      lasts: another engine takes a dead engine's runs within about this time. A SQLite file
      takes one writing engine: a second one is refused at open (StoreInUse).
    retention: move ended runs older than `Retention.keep_for` out of the store into
      verified export files, in the background every `Retention.every` (None: keep them).
    keep_finished / keep_finished_for: how many ended runs' final states are kept in memory,
      and for how many seconds (None: no age limit), so get and wait answer a run that just
      ended without a read; older ones are read from the store when asked for.
    """

    def __init__(
        self,
        store: str | EventStore = "sqlite:///rulebound.db",
        workflows: Iterable[Workflow] = (),
        executors: Mapping[str, Any] | None = None,
        *,
        registry: Registry | None = None,
        rate_limits: Mapping[str, RateLimit] | None = None,
        max_concurrency: int = 256,
        max_active_runs: int = 100_000,
        clock: Clock | None = None,
        worker: str | None = None,
        recover: bool = True,
        drain_timeout: float = 10.0,
        keep_finished: int = 10_000,
        keep_finished_for: float | None = 30.0,
        read_only: bool = False,
        lease_time: float = 10.0,
        park_after: float | None = 30.0,
        retention: Retention | None = None,
    ) -> None:
        self.registry = registry or Registry()
        for workflow in workflows:
            self.registry.add(workflow)
        self.registry.executors.update(executors or {})
        self.registry.rate_limits.update(rate_limits or {})
        self._store_spec = store
        self._clock = clock or SystemClock()
        self.worker = worker or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self._max_active = max_active_runs
        self._read_only = read_only
        self._recover_on_start = recover and not read_only
        self._drain_timeout = drain_timeout
        self.metrics = EngineMetrics()
        if keep_finished_for is not None and not keep_finished_for > 0:
            raise InvalidInput(f"keep_finished_for must be more than 0 seconds or None, "
                               f"not {keep_finished_for!r}")
        self.runs_table = RunTable(self.registry, keep_finished=keep_finished,
                                   keep_finished_for=keep_finished_for,
                                   clock=self._clock.monotonic)
        self.turns = Turns()
        self.feed = Feed()
        self.dispatch = Dispatcher(slots=max_concurrency, clock=self._clock, worker=self.worker,
                                   metrics=self.metrics, wake=self._wake_by_id)
        self.timers = Timers(self._clock, self._on_timer, self.dispatch.waiting)
        self._background: set[asyncio.Task[Any]] = set()
        self._requests: set[asyncio.Task[Any]] = set()
        self._context = ExecutorContext()
        self._storage: StoreWorker | None = None
        self._project_wanted: asyncio.Event | None = None
        self.state = EngineState.NEW
        self._limits: dict[str, dict[str, Any]] = {}
        self.results_pending = 0  # results waiting for the store to come back
        self._lease_time = lease_time
        self._park_after = park_after
        self._parking = False  # the store keeps parked runs (set at open)
        self.parked = 0  # runs this engine moved out of memory
        self.ownership: Ownership | None = None  # None: one engine owns every run
        self._leaving: dict[int, float] = {}  # shards being handed over -> since (monotonic)
        self._coordination: ThreadPoolExecutor | None = None  # leases and the change feed
        self._feed_position = 0
        self._retention = retention
        self.retainer: Retainer | None = None  # the running retention, once open

    # --- lifecycle ------------------------------------------------------------------------

    async def __aenter__(self) -> Engine:
        await self.open()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    async def open(self) -> None:
        """Connect, start the store threads and executors, recover unfinished runs.

        All or nothing: if any part fails, everything already started is stopped again and
        the engine is left as it was, so `open()` can simply be called again.
        """
        if self.state is EngineState.OPEN:
            return
        if self.state in (EngineState.OPENING, EngineState.CLOSING):
            raise EngineClosed(f"the engine is {self.state.value}; wait for that to finish")
        missing = [] if self._read_only else self.registry.missing_executors()
        if missing:
            text = ", ".join(f"{e!r} (workflow {w!r})" for w, e in missing)
            raise DefinitionError(f"no executor registered for {text}")
        if not self._read_only:
            names = self.registry.names()
            self._check_token_rules(
                newest=[self.registry.latest(name) for name in names],
                older=[wf for name in names for wf in self.registry.versions(name)[:-1]])
        self.state = EngineState.OPENING
        opened: list[Any] = []
        try:
            store = self._store_spec
            if isinstance(store, str):
                store = await asyncio.get_running_loop().run_in_executor(None, open_store,
                                                                         store)
            self._storage = StoreWorker(store)
            self._parking = not self._read_only and self._parks(store)
            self._storage.start()
            self.timers.stopped = False
            self.dispatch.set_rate_limits(self.registry.rate_limits)
            self.dispatch.secrets = self._secret_values()
            for executor in () if self._read_only else self.registry.executors.values():
                opener = getattr(executor, "open", None)
                if opener is not None:
                    await opener(self._context)
                    opened.append(executor)
            self._project_wanted = asyncio.Event()
            self._spawn(self._project_loop())
            if not self._read_only:
                await self._claim_store(store)
            if self._recover_on_start:
                await self._recover()
            if self._parking:
                self._spawn(self._unpark_due_loop())
            if self.runs_table.keep_finished_for is not None:
                self._spawn(self._expire_loop(self.runs_table.keep_finished_for))
            if self._retention is not None and not self._read_only:
                self.retainer = Retainer(self._retention, self._storage, self.registry,
                                         self._clock)
                self._spawn(self.retainer.run())  # cancelled (between two runs) at close
        except BaseException:
            # Left as it was: a store the caller handed in stays open for the next try.
            await self._stop(opened, close_store=isinstance(self._store_spec, str))
            self.state = EngineState.NEW
            raise
        self.state = EngineState.OPEN

    async def close(self) -> None:
        """Stop taking requests, let running attempts finish (up to drain_timeout), flush."""
        if self.state is not EngineState.OPEN:
            return
        self.state = EngineState.CLOSING
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._drain_timeout
        if self._requests:  # requests already taken finish first: their writes are owned
            await asyncio.wait(list(self._requests), timeout=self._drain_timeout)
        # Attempts launched while we drain (a result's write that also started the next
        # step) are waited for too, until none is left or the one deadline passes.
        while in_flight := self._attempt_tasks():
            left = deadline - loop.time()
            if left <= 0:
                break
            await asyncio.wait(in_flight, timeout=left)
        await self._stop(list(self.registry.executors.values()))
        self.state = EngineState.CLOSED

    async def _stop(self, executors: list[Any], *, close_store: bool = True) -> None:
        """Stop timers, background work, executors and the store threads (never raises)."""
        self.timers.stopped = True
        for run in self.runs_table.live.values():
            self.timers.cancel(run)
            self.feed.close(run)
        attempts = self._attempt_tasks()
        for task in attempts:  # cut off: the next engine abandons and re-runs them
            task.cancel()
        await asyncio.gather(*attempts, return_exceptions=True)
        for task in [*self._background, *self._requests]:
            task.cancel()
        await asyncio.gather(*self._background, *self._requests, return_exceptions=True)
        if self.ownership is not None and self._storage is not None:
            # A graceful stop hands the shards over at once instead of letting them expire.
            with contextlib.suppress(Exception):
                await self._coordinate(self._storage.store.lease_cycle,  # type: ignore[attr-defined]
                                       self.worker, self._lease_time, {}, leaving=True)
        self.ownership = None
        self._leaving.clear()
        if self._coordination is not None:
            self._coordination.shutdown(wait=False, cancel_futures=True)
            self._coordination = None
        if self._storage is not None:
            with contextlib.suppress(Exception):
                await self._storage.project()
        for executor in executors:
            closer = getattr(executor, "close", None)
            if closer is not None:
                with contextlib.suppress(Exception):
                    await closer()
        await self._context.aclose()
        self._context = ExecutorContext()
        if self._storage is not None:
            with contextlib.suppress(Exception):
                await self._storage.close(close_store=close_store)
        self._storage = None
        self.runs_table.live.clear()

    def _attempt_tasks(self) -> list[asyncio.Task[None]]:
        return [t for run in self.runs_table.live.values() for t in run.attempts.values()
                if not t.done()]

    def _secret_values(self) -> tuple[str, ...]:
        """Values no stored message may contain: what executors declare as their secrets."""
        found: set[str] = set()
        for executor in self.registry.executors.values():
            declared = getattr(executor, "secret_values", None)
            if callable(declared):
                with contextlib.suppress(Exception):
                    found.update(v for v in declared() if isinstance(v, str) and len(v) >= 4)
        return tuple(sorted(found, key=len, reverse=True))

    def _spawn(self, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def _owned(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run a request as a task the engine owns; the caller awaits it shielded.

        A caller cancelled meanwhile (a handler at shutdown, a `wait_for`) stops waiting, but
        the request goes on to the end: a write handed to the store is always followed by
        what must follow it (launching attempts, arming timers, feeding followers).
        """
        task = asyncio.get_running_loop().create_task(coro)
        self._requests.add(task)
        task.add_done_callback(_finished_request(self._requests))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.cancelled() and not _being_cancelled():
                # Not our caller's cancellation: the engine stopped before finishing it.
                raise EngineClosed("the engine stopped before this request finished; its "
                                   "outcome is unknown (retry it with the same key or id)"
                                   ) from None
            raise

    @property
    def storage(self) -> StoreWorker:
        if self._storage is None or self.state not in (EngineState.OPEN, EngineState.OPENING,
                                                        EngineState.CLOSING):
            raise EngineClosed("the engine is not open; use `async with Engine(...)`")
        return self._storage

    @property
    def _driving(self) -> bool:
        """Runs are being driven: timers fire, results are written (also during recovery)."""
        return self.state is EngineState.OPEN or self.state is EngineState.OPENING

    @property
    def quarantined(self) -> dict[UUID, str]:
        """Runs whose log cannot be folded, with the reason: reported, never driven."""
        return {run_id: str(exc) for run_id, exc in self.runs_table.quarantined.items()}

    # --- the facade ---------------------------------------------------------------------

    async def start(self, workflow: str, input: Any = None, idempotency_key: str | None = None
                    ) -> UUID:
        """Start a run of the newest version of `workflow`; the same key gives the same run.

        idempotency_key: the same key with the same input returns the first run; with a
          different input it raises IdempotencyConflict naming the key.
        """
        return (await self.start_run(workflow, input, idempotency_key))[0]

    async def start_run(self, workflow: str, input: Any = None,
                        idempotency_key: str | None = None) -> tuple[UUID, bool]:
        """`start`, also saying whether this call created the run (False: key seen before)."""
        self._check_open()
        definition = self.registry.latest(workflow)
        checked = validate(definition.input_schema, input, f"input of {workflow!r}")
        _check_storable(checked, f"input of {workflow!r}")
        if idempotency_key is None:
            if len(self.runs_table.live) >= self._max_active:
                raise Overloaded(f"{len(self.runs_table.live)} runs in flight "
                                 "(max_active_runs)", 1.0)
            run_id = uuid4()
            await self._owned(self._create(run_id, definition, checked, None))
            return run_id, True
        run_id = uuid5(RUN_NAMESPACE, f"{workflow}\x00{idempotency_key}")
        return await self._owned(self._start_keyed(run_id, definition, checked,
                                                   idempotency_key))

    async def _start_keyed(self, run_id: UUID, definition: Workflow, input: Any,
                           key: str) -> tuple[UUID, bool]:
        async with self.runs_table.alone_with(run_id):  # one creator per key at a time
            state = await self._known_state(run_id)
            if state is None:
                if len(self.runs_table.live) >= self._max_active:
                    raise Overloaded(f"{len(self.runs_table.live)} runs in flight "
                                     "(max_active_runs)", 1.0)
                created = await self._create(run_id, definition, input, key)
                if created:
                    return run_id, True
                state = await self._known_state(run_id)
                assert state is not None
        if state.input != input:
            raise IdempotencyConflict(
                f"idempotency key {key!r} already started run {run_id} of "
                f"{definition.name!r} with a different input")
        return run_id, False

    async def _known_state(self, run_id: UUID) -> RunState | None:
        """The run's state if it exists (live here, ended, or stored), taking it up if it is
        stored and going; None if there is no such run."""
        run = self.runs_table.live.get(run_id)
        if run is not None:
            return run.state
        state = self.runs_table.final_state(run_id)
        if state is not None:
            return state
        if not await self.storage.read(run_id, 0):
            return None
        adopted = await self._take_up(run_id)
        if adopted is not None:
            return adopted.state
        state = self.runs_table.final_state(run_id)  # none kept with keep_finished=0
        if state is None:
            state, _hash, _ = await self.runs_table.load(self.storage, run_id)
        return state

    async def _create(self, run_id: UUID, definition: Workflow, input: Any,
                      key: str | None) -> bool:
        """Write a new run's first events; False if another writer created it first."""
        run = LiveRun(run_id, definition, RunState(), codec.GENESIS_HASH)
        self.runs_table.live[run_id] = run
        started = ev.RunStarted(
            at=self._clock.now(), workflow=definition.name, definition_hash=definition.hash,
            input=input, limits=self._limits_of(definition), idempotency_key=key,
            seed=secrets.randbits(63), traceparent=TRACEPARENT.get())
        try:
            async with run.lock:
                await self._commit(run, [started])
        except ConcurrencyConflict:
            # Another engine created the same idempotent run first: take up what it wrote,
            # and hand over whoever already waits for this run.
            self.runs_table.live.pop(run_id, None)
            self.timers.cancel(run)
            self.feed.hand_over(run, await self._take_up(run_id))
            return False
        except BaseException:
            if run.state.version == 0:
                self.runs_table.live.pop(run_id, None)
                self.timers.cancel(run)  # this object no longer stands for the run
                # The write's outcome is unknown: if it landed, the run exists; settle that
                # now (after every write handed over before), so the run is driven or gone.
                self._spawn(self._take_up_if_stored(run))
            raise
        return True

    async def _take_up_if_stored(self, old: LiveRun) -> None:
        """A start whose first write failed: is the run stored after all? Ask until the store
        answers (the write may have landed), then drive it or let its waiters go."""
        run: LiveRun | None = None
        delay = 0.1
        try:
            while self._driving:
                try:
                    async with self.runs_table.alone_with(old.run_id):
                        await self.storage.barrier()  # writes handed over before are settled
                        run = await self._take_up(old.run_id)
                    return
                except RunNotFound:
                    return  # the write did not land: there is no run
                except StoreError as exc:
                    if not exc.transient:
                        raise
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, _RESULT_BACKOFF_MAX)
        except Exception as exc:
            log.warning("run %s: cannot check whether its failed start landed (%s); the "
                        "next engine start recovers it if it did", old.run_id, short(exc))
        finally:
            self.feed.hand_over(old, run)

    async def _take_up(self, run_id: UUID) -> LiveRun | None:
        """Drive a stored, going run here: load it and reconcile it (None if it has ended)."""
        if self._parking and run_id not in self.runs_table.live and self._owns(run_id):
            # Before it can be parked again, so a new parking is never the one undone. Only
            # the owner: the parking row is its timer, and only it loads the run at that time.
            await self._unpark(run_id)
        run = await self.runs_table.adopt(self.storage, run_id)
        if run is not None and run.reconcile and not run.held:
            await self._reconcile(run)
        return run

    def _limits_of(self, definition: Workflow) -> dict[str, Any]:
        """`definition.limits.model_dump()`, dumped once per definition (a fresh copy each)."""
        dumped = self._limits.get(definition.hash)
        if dumped is None:
            dumped = self._limits[definition.hash] = definition.limits.model_dump()
        return dict(dumped)

    async def get(self, run_id: UUID | str) -> RunView:
        run_id = _uuid(run_id)
        run = self.runs_table.live.get(run_id)
        if run is not None:
            return self._view(run)
        if run_id in self.runs_table.quarantined:
            raise self.runs_table.quarantined[run_id]
        state = self.runs_table.final_state(run_id)
        if state is None:
            state, _hash, _ = await self.runs_table.load(self.storage, run_id)
        definition = self.registry.by_hash(state.definition_hash)
        if definition is None and not state.terminal and not self._read_only:
            reason = held_reason(run_id, state)  # a parked run on a version not registered
            return RunView.of(run_id, state, status="held", reason=reason)
        return RunView.of(run_id, state, waiting_for=_waiting_for(definition, state))

    async def wait(
        self,
        run_id: UUID | str,
        timeout: float | None = None,  # noqa: ASYNC109 (fixed by the facade contract)
    ) -> RunView:
        """Wait until the run ends (or is held); raises TimeoutError after `timeout` s."""
        run_id = _uuid(run_id)
        run = self.runs_table.live.get(run_id)
        if run is None and self.state is EngineState.OPEN and not self._read_only and (
                run_id not in self.runs_table.finished):
            with contextlib.suppress(RunNotFound):  # parked, or another engine's: wait here
                run = await self._live_or_none(run_id)
        if run is None or run.state.terminal or run.held:
            return await self.get(run_id)
        await self.feed.wait(run, timeout)
        if run.state.terminal:  # the final state is at hand: no copy from the ended cache
            return self._view(run)
        return await self.get(run_id)

    async def events(self, run_id: UUID | str, after: int = 0) -> list[ev.Event]:
        """The run's events in order (event n has sequence number n)."""
        return [event for _seq, event in await self._stored_events(_uuid(run_id), after)]

    async def _stored_events(self, run_id: UUID, after: int) -> list[tuple[int, ev.Event]]:
        _check_position(after)
        records = await self.storage.read(run_id, after)
        if not records and after == 0:
            raise RunNotFound(f"no run {run_id}")
        return await self.storage.call(_decode_all, run_id, records)

    async def watch(self, run_id: UUID | str, after: int = 0) -> AsyncIterator[ev.Event]:
        """Events after sequence `after`, then new ones as they are appended, until the end."""
        async for _seq, event in self.follow(run_id, after):
            yield event

    async def follow(self, run_id: UUID | str, after: int = 0
                     ) -> AsyncGenerator[tuple[int, ev.Event], None]:
        """`watch` with each event's stored sequence number (what an SSE id should be)."""
        run_id = _uuid(run_id)
        _check_position(after)
        run = self.runs_table.live.get(run_id)
        if run is None and not self._read_only and run_id not in self.runs_table.finished:
            with contextlib.suppress(RunNotFound):
                run = await self._live_or_none(run_id)  # stored and going: drive it here
        queue: asyncio.Queue[tuple[int, ev.Event]] = asyncio.Queue()
        if run is not None:
            run.watchers.append(queue)
        try:
            seen = after
            records = await self.storage.read(run_id, after)
            if not records and after == 0 and run is None:
                raise RunNotFound(f"no run {run_id}")
            for seq, event in await self.storage.call(_decode_all, run_id, records):
                seen = seq
                yield seq, event
                if event.type in ev.TERMINAL_EVENTS:
                    return
            if run is None:
                return
            while True:
                if run.state.terminal and queue.empty() and seen >= run.state.version:
                    return  # ended while we read: nothing more will come
                seq, event = await queue.get()
                if seq == _ENGINE_CLOSED:
                    raise EngineClosed(f"the engine closed while run {run_id} was followed; "
                                       f"follow it again after event {seen}")
                if seq == _RUN_RETIRED:
                    raise self.runs_table.quarantined.get(run_id) or RunNotFound(
                        f"run {run_id} can no longer be followed")
                if seq <= seen:
                    continue
                seen = seq
                yield seq, event
                if event.type in ev.TERMINAL_EVENTS:
                    return
        finally:
            if run is not None and queue in run.watchers:
                run.watchers.remove(queue)

    async def signal(self, run_id: UUID | str, name: str, payload: Any = None, *,
                     id: str | None = None) -> None:
        """Send the run a signal; it answers the step waiting for `name`, now or later.

        name: must be a signal some step of the run's workflow waits for.
        payload: validated against that step's output schema on receipt.
        id: a dedup id of the sender's choice: the same id again records nothing more and
          returns as the first call did (IdempotencyConflict if it named another signal).
        """
        self._check_open()
        if id is not None and (not isinstance(id, str) or not 1 <= len(id) <= 200):
            raise InvalidInput("a signal id must be a string of 1 to 200 characters")
        await self._owned(self._signal(_uuid(run_id), name, payload, id))

    async def _signal(self, run_id: UUID, name: str, payload: Any, id: str | None) -> None:
        for _ in range(_REPLACED_RETRIES):
            run = await self._live_or_none(run_id)
            if run is None:  # ended: a resend of a signal it recorded still succeeds
                state = await self._ended_state(run_id)
                if id is not None and _seen_signal(state, id, name):
                    return
                raise RunTerminal(f"run {run_id} has ended ({state.status})")
            async with run.lock:
                if self.runs_table.live.get(run_id) is not run and not run.state.terminal:
                    continue  # replaced while we waited for the lock: follow it
                await self._refresh(run)
                if id is not None and _seen_signal(run.state, id, name):
                    return
                self._check_live(run)
                assert run.definition is not None
                checked = _signal_payload(run.definition, run.state, name, payload)
                await self._commit(run, [ev.SignalReceived(
                    at=self._clock.now(), name=name, payload=checked, signal_id=id)])
                return
        raise RunNotFound(f"no run {run_id}: its start did not complete")

    async def cancel(self, run_id: UUID | str, reason: str = "cancelled") -> None:
        self._check_open()
        await self._owned(self._cancel(_uuid(run_id), reason))

    async def _cancel(self, run_id: UUID, reason: str) -> None:
        for _ in range(_REPLACED_RETRIES):
            run = await self._live_or_none(run_id)
            if run is None:
                state = await self._ended_state(run_id)
                raise RunTerminal(f"run {run_id} has ended ({state.status})")
            async with run.lock:
                if self.runs_table.live.get(run_id) is not run and not run.state.terminal:
                    continue
                await self._refresh(run)
                self._check_live(run)
                await self._commit(run, [ev.CancelRequested(at=self._clock.now(),
                                                            reason=reason)])
                return
        raise RunNotFound(f"no run {run_id}: its start did not complete")

    async def explain(self, run_id: UUID | str) -> str:
        run_id = _uuid(run_id)
        events = await self.events(run_id)
        definition = None
        if events and isinstance(events[0], ev.RunStarted):
            definition = self.registry.by_hash(events[0].definition_hash)
        return explain_events(events, definition, run_id=str(run_id))

    async def runs(self, *, status: str | None = None, workflow: str | None = None,
                   limit: int = 100, offset: int = 0) -> list[RunRow]:
        """Runs from the read model (brought up to date first), newest first."""
        await self.storage.project()
        return await self.storage.call(
            lambda: self.storage.store.list_runs(status=status, workflow=workflow,
                                                 limit=limit, offset=offset))

    async def count_runs(self) -> dict[str, int]:
        await self.storage.project()
        return await self.storage.call(self.storage.store.count_runs)

    def register(self, workflow: Workflow, *, newest: bool = True) -> None:
        """Add a workflow version at run time; runs held for that version resume.

        By default new runs take it from now on. `newest=False` registers an older version
        only so that its held runs can finish; new runs keep taking the current newest.
        The same checks as at open apply: every executor it names must be registered.
        """
        if not self._read_only:
            missing = sorted(self.registry.executors_missing_for(workflow))
            if missing:
                raise DefinitionError(
                    "no executor registered for "
                    + ", ".join(f"{e!r} (workflow {workflow.name!r})" for e in missing))
        known = self.registry.by_hash(workflow.hash) is not None
        if not self._read_only and not (known and not newest):  # the same rules as at open
            if newest or not self.registry.versions(workflow.name):
                self._check_token_rules(newest=[workflow], older=[])
            else:
                self._check_token_rules(newest=[], older=[workflow])
        self.registry.add(workflow, newest=newest)
        for run in list(self.runs_table.live.values()):
            if run.held and run.state.definition_hash == workflow.hash:
                run.held = None
                run.definition = workflow
                run.reconcile = True
                self._spawn(self._wake(run))

    def _check_token_rules(self, newest: list[Workflow], older: list[Workflow]) -> None:
        """Steps that reserve no tokens where a reservation is what keeps a limit.

        A token rate limit is a window every run shares: every version's steps must reserve.
        A run's token limit is kept by reserving each attempt's worst case, so the version new
        runs take must budget its model steps; an older version may stay registered only so
        that its runs (started under the old rules) can finish: warn, do not refuse.
        """
        _refuse(self.registry.unreserved_token_steps([*newest, *older]),
                "steps on an executor with a token rate limit must declare max_tokens, so "
                "each call reserves its worst case in the window")
        _refuse(self.registry.unbudgeted_model_steps(newest),
                "steps on a model executor must declare max_tokens: the run's token limit is "
                "kept by reserving each attempt's worst case before it is scheduled")
        for w, step, e in self.registry.unbudgeted_model_steps(older):
            log.warning("an older version of %r has model step %r (executor %r) without "
                        "max_tokens: its runs reserve nothing against their token limit",
                        w, step, e)

    @property
    def attempts_in_flight(self) -> int:
        """Attempts whose executor is running here now (what a stop would cut off)."""
        return sum(len(run.attempts) for run in self.runs_table.live.values())

    @property
    def followers(self) -> int:
        """Callers following live runs' events (`watch`, `follow`, SSE streams)."""
        return sum(len(run.watchers) for run in self.runs_table.live.values())

    @property
    def active_runs(self) -> int:
        return len(self.runs_table.live)

    @property
    def ended_states_kept(self) -> int:
        """Ended runs whose final state is kept in memory (keep_finished, keep_finished_for):
        it falls as they age out, which is when their memory can be given back."""
        return len(self.runs_table.finished)

    @property
    def saturation(self) -> float:
        """Busy fraction of the run capacity (for backpressure and /metrics)."""
        return len(self.runs_table.live) / self._max_active

    # --- the commit path: fold, decide, claim, stamp, append, launch ------------------------

    async def _commit(self, run: LiveRun, triggers: list[ev.Event], *,
                      took_turn: bool = False) -> None:
        """Append `triggers` and everything they lead to, atomically. Caller holds run.lock.

        If the write fails, the run is marked dirty (its stored tail is unknown) and woken
        again shortly, so the next holder of its lock reloads and reconciles it.
        took_turn: the caller already waited for its turn (an attempt's result).
        """
        if not took_turn:
            waiter = self.turns.gate()
            if waiter is not None:
                await waiter  # let through by the turn's end: this iteration's turn counts it
                self.turns.admitted()
        owned = self._owns(run.run_id)
        if run.dirty or (not owned and run.state.version):  # another's run moves without us
            await self._reload(run)
        if run.definition is None or run.held or run.state.terminal:
            return
        if not owned:
            await self._append_request(run, triggers)
            return
        now = self._clock.now()
        reconciling = run.reconcile
        if reconciling:  # cleared once the write that settles them has landed
            triggers = [*run.orphaned_attempts(now), *triggers]
        state = run.state
        if not triggers:
            # A wake-up with no new fact: time itself is the trigger. Record which timers
            # came due, so every batch of decisions in the log follows the fact it answers.
            triggers = [ev.TimerFired(at=now, timer=name)
                        for when, name in due_timers(run.definition, state) if when <= now]
        for event in triggers:
            state = evolve(state, event)
        decided, state = advance(run.definition, state, now)
        if self.state is EngineState.CLOSING or self._handing_over(run.run_id):
            claimed: list[Claim] = []
        else:
            refused = await self._shared_admission(run, state, now)
            claimed, state = self.dispatch.claim(run, state, now, refused)
        batch: list[ev.Event] = [*triggers, *decided, *(c.event for c in claimed)]
        if not batch:
            self.timers.arm(run, now=now)  # nothing was written: `now` is current
            if self.dispatch.waiting and self.dispatch.free > 0:
                self.dispatch.wake_waiting()
            self._maybe_park(run)
            return
        records: list[Record] = []
        stamps: list[tuple[str, str]] = []
        prev = run.last_hash
        seq = run.state.version
        run_id = run.run_id
        stamp = codec.stamp
        # codec.event_id and Record's Python-level __new__ inlined: five events per step.
        prefix = run.id_text[:24]
        for event in batch:
            seq += 1
            event_id = f"{prefix}{seq:012x}"
            prev, data = stamp(event, event_id, prev)
            stamps.append((event_id, prev))
            records.append(_tuple_new(Record, (run_id, seq, event.type, data)))
        fence = self.ownership.fence(run_id) if self.ownership is not None else None
        try:
            await self.storage.append(records, fence)
        except Fenced as exc:
            self.dispatch.unclaim(claimed)
            run.dirty = True
            log.warning("run %s: this engine no longer owns its shard; the write was refused "
                        "(fenced) and the run is left to its new owner", run_id)
            self._lose(set(exc.shards))
            if all(t.type in _REQUEST_EVENTS for t in triggers):
                await self._append_request(run, triggers)  # a request stands: append it
                return
            raise
        except BaseException:
            self.dispatch.unclaim(claimed)
            run.dirty = True  # the write may or may not have landed: read back before use
            if self._driving:
                self.timers.retry_soon(run)  # reconcile even if nobody else touches the run
            raise
        run.state = state
        run.last_hash = prev
        if reconciling:
            run.reconcile = False
        self.metrics.commits += 1
        self._after_commit(run, batch, stamps, claimed)

    def _after_commit(self, run: LiveRun, batch: list[ev.Event], stamps: list[tuple[str, str]],
                      claimed: list[Claim]) -> None:
        if not run.state.terminal:  # first of all, what the write promised: its attempts run
            loop = asyncio.get_running_loop()
            for claim in claimed:
                run.attempts[claim.key] = loop.create_task(self._attempt(run, claim))
        try:
            if run.watchers:
                stamped = [codec.stamped(e, i, h)
                           for e, (i, h) in zip(batch, stamps, strict=True)]
                self.feed.publish(run, run.state.version - len(batch) + 1, stamped)
            if self.feed.listeners:
                self.feed.committed(run, batch)
        except Exception:  # an observer's failure must not leave the run undriven
            log.exception("run %s: a follower or listener failed", run.run_id)
        metrics = self.metrics
        for event in batch:
            kind = event.type
            if kind == "AttemptSucceeded" or kind == "AttemptFailed":
                usage = event.usage  # type: ignore[attr-defined]
                metrics.attempts += 1
                metrics.attempts_failed += kind == "AttemptFailed"
                metrics.cost += usage.cost
                metrics.tokens += usage.tokens_in + usage.tokens_out
                metrics.latency.observe(event.latency)  # type: ignore[attr-defined]
            elif kind == "StepScheduled" and event.attempt > 1:  # type: ignore[attr-defined]
                metrics.retries += 1
        if batch[0].type == "RunStarted" or run.state.terminal:
            self._poke_projector()
        if run.state.terminal:
            self._finish(run)
            return
        self.timers.arm(run)  # after the write: read the clock again
        if self.dispatch.waiting and self.dispatch.free > 0:
            self.dispatch.wake_waiting()
        self._maybe_park(run)

    async def _append_request(self, run: LiveRun, triggers: list[ev.Event]) -> None:
        """Append a request's events to a run another engine owns: no decisions here (the
        owner decides, told by the change feed). A conflict means the log moved: reload and
        place the request after what is there, as long as the run is still going."""
        if not triggers:
            return
        for _ in range(10):
            prev, seq, records, stamped = run.last_hash, run.state.version, [], []
            for event in triggers:
                seq += 1
                event_id = codec.event_id(run.run_id, seq)
                prev, data = codec.stamp(event, event_id, prev)
                records.append(Record(run.run_id, seq, event.type, data))
                stamped.append(codec.stamped(event, event_id, prev))
            try:
                await self.storage.append(records)
            except ConcurrencyConflict:
                await self._reload(run)
                if run.state.terminal:
                    raise RunTerminal(f"run {run.run_id} has ended ({run.state.status})"
                                      ) from None
                continue
            except BaseException:
                run.dirty = True
                raise
            await self._wake_parked(run.run_id)
            state = run.state
            for event in triggers:
                state = evolve(state, event)
            first = run.state.version + 1
            run.state, run.last_hash = state, prev
            self.metrics.commits += 1
            if run.watchers:
                self.feed.publish(run, first, stamped)
            if triggers[0].type == "RunStarted":
                self._poke_projector()
            return
        raise ConcurrencyConflict(f"run {run.run_id}: its log kept moving; try again",
                                  [run.run_id])

    async def _wake_parked(self, run_id: UUID) -> None:
        """A request appended to another engine's run: if its owner parked it, make it due
        now in the store, so the owner of the moment loads it at its next poll whether or
        not its change feed told it (a note can arrive while the shard changes hands)."""
        wake = getattr(self.storage.store, "wake_parked", None)
        if wake is None:
            return
        try:
            await self.storage.call(wake, run_id, _epoch(self._clock.now()))
        except Exception as exc:  # the request stands; the owner's change feed remains
            log.warning("run %s: cannot mark its parking due (%s)", run_id, short(exc))

    def _finish(self, run: LiveRun) -> None:
        self.timers.cancel(run)
        current = asyncio.current_task()
        for task in run.attempts.values():
            if task is not current:
                task.cancel()  # a cancelled run or a deadline: in-flight results are unwanted
        self.feed.end(run)
        self.dispatch.waiting.pop(run.run_id, None)
        self.runs_table.ended(run)

    async def _refresh(self, run: LiveRun) -> None:
        """Under the run's lock: if its stored tail is unknown (or another engine writes
        it), read it back first."""
        if run.dirty or not self._owns(run.run_id):
            await self._reload(run)

    async def _reload(self, run: LiveRun) -> None:
        """Read the events stored beyond what we hold, fold them, feed them to followers.

        Whatever the reload finds may show attempts running that nothing here runs: the next
        commit reconciles them.
        """
        before = run.state.version
        await self.storage.barrier()  # a write of ours still in the writer lands first
        try:
            state, last_hash, found = await self.runs_table.load(
                self.storage, run.run_id, before, run.state, run.last_hash)
        except CorruptRun as exc:
            self._retire(run, exc)
            raise
        run.state, run.last_hash, run.dirty = state, last_hash, False
        run.reconcile = True
        if found:
            self.feed.publish(run, before + 1, found)
        if state.terminal:
            self._finish(run)

    def _retire(self, run: LiveRun, problem: CorruptRun) -> None:
        """A run whose log can no longer be folded: quarantined, never driven again; whoever
        waits for it or follows it is told (get and follow raise the problem)."""
        log.error("quarantined: %s", problem)
        self.runs_table.quarantine(run.run_id, problem)
        self.timers.cancel(run)
        current = asyncio.current_task()
        for task in run.attempts.values():
            if task is not current:
                task.cancel()
        self.dispatch.waiting.pop(run.run_id, None)
        self.feed.retire(run)

    async def _reconcile(self, run: LiveRun) -> None:
        """Bring a run's log in line with what really runs here, and re-arm its timer."""
        async with run.lock:
            if (run.state.terminal or run.held or not self._owns(run.run_id)
                    or self.runs_table.live.get(run.run_id) is not run):
                return  # ended, not ours, or parked away while we waited for the lock
            run.reconcile = True
            await self._commit(run, [])

    # --- attempts ---------------------------------------------------------------------------

    async def _attempt(self, run: LiveRun, claim: Claim) -> None:
        """Run one attempt, then deliver its result to the log."""
        definition = run.definition
        assert definition is not None
        dispatch = self.dispatch
        st = run.state.steps[claim.key]
        step = definition.task(st.name)
        event: ev.Event
        began = self._clock.monotonic()
        try:
            task = Task(
                run_id=run.run_id, step=claim.key, attempt=st.attempt,
                idempotency_key=f"{run.id_text}:{claim.key}:{st.visit}",
                input=build_input(definition, run.state, claim.key), config=step.config,
                output_schema=step.output, timeout=step.timeout,
                deadline=claim.event.deadline, max_tokens=st.max_tokens, max_cost=st.max_cost)
            result, error = await dispatch.call(self.registry.executors[step.executor], task,
                                                claim)
            # Results that end together take turns with the rest of the loop, like commits:
            # 10,000 executors whose sleeps end in one iteration would otherwise all build
            # their events (and commit) in it. The turn covers the commit below as well.
            waiter = self.turns.gate()
            if waiter is not None:
                queued = self._clock.monotonic()
                await waiter
                self.turns.admitted()
                began += self._clock.monotonic() - queued  # latency: the executor's alone
            event = dispatch.outcome(step, task, claim, began, result, error)
        except asyncio.CancelledError:
            claim.release()  # no-op once the call was made
            dispatch.release_slot()
            _forget_attempt(run, claim.key)
            raise
        except Exception as exc:  # a bug in building the task: record it, never crash the loop
            event = dispatch.failure(claim, "error", short(exc), False, began)
        dispatch.release_slot()
        try:
            await self._deliver(run, claim, event, took_turn=True)
        except Exception as exc:  # never an unretrieved task exception
            log.error("run %s: the result of %s attempt %d was not delivered: %s",
                      run.run_id, claim.key, claim.event.attempt, short(exc))
        finally:
            # Only this attempt's own entry: the same commit may have launched its retry.
            _forget_attempt(run, claim.key)

    async def _deliver(self, run: LiveRun, claim: Claim, event: ev.Event, *,
                       took_turn: bool = False) -> None:
        """Write an attempt's result; while the store is down, keep it and try again.

        The result is never dropped while this process lives: it is retried with backoff
        until it is written, the run moves on without it, or the run's deadline passes (the
        deadline then decides the run when the store answers again). took_turn: the first
        try commits in the turn the result already took (no second place in the queue);
        a retry queues for a turn of its own.
        """
        delay = 0.05
        waiting = False
        try:
            while True:
                try:
                    async with run.lock:
                        await self._refresh(run)
                        current = run.state.steps.get(claim.key)
                        if (run.state.terminal or current is None
                                or current.status != "running"
                                or current.attempt != claim.event.attempt
                                or run.attempts.get(claim.key) is not asyncio.current_task()
                                or self.runs_table.live.get(run.run_id) is not run):
                            return  # a late result for an attempt the run no longer waits for
                        await self._commit(run, [event], took_turn=took_turn)
                    return
                except (StoreError, CorruptRun) as exc:
                    transient = isinstance(exc, StoreError) and exc.transient
                    if not transient or not self._driving:
                        # Trying again cannot help (or the engine is stopping): the run was
                        # marked for reconciliation, which abandons this attempt and decides
                        # again once the run can be read.
                        log.error("run %s: the result of %s attempt %d could not be written "
                                  "(%s); the attempt will be abandoned and run again",
                                  run.run_id, claim.key, claim.event.attempt, short(exc))
                        return
                    deadline = run.deadline_at
                    if deadline is not None and self._clock.now() >= deadline:
                        log.error("run %s: the store did not answer before the run's deadline; "
                                  "the result of %s attempt %d is dropped", run.run_id,
                                  claim.key, claim.event.attempt)
                        return
                    if not waiting:
                        waiting = True
                        self.results_pending += 1
                    log.warning("run %s: writing the result of %s failed (%s); trying again "
                                "in %.2fs", run.run_id, claim.key, short(exc), delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, _RESULT_BACKOFF_MAX)
                    took_turn = False
        finally:
            if waiting:
                self.results_pending -= 1

    # --- time ------------------------------------------------------------------------------

    def _on_timer(self, run: LiveRun) -> None:
        if self._driving and self.runs_table.live.get(run.run_id) is run:
            self._spawn(self._wake(run))

    def _wake_by_id(self, run_id: UUID) -> bool:
        run = self.runs_table.live.get(run_id)
        if run is None or run.state.terminal:
            return False
        self._spawn(self._wake(run))
        return True

    async def _wake(self, run: LiveRun) -> None:
        self.metrics.wakes += 1
        async with run.lock:
            if (run.definition is None or run.state.terminal or not self._driving
                    or self.runs_table.live.get(run.run_id) is not run):
                return  # ended, stopped, or no longer the object that stands for the run
            try:
                await self._commit(run, [])  # adds TimerFired for whatever came due
            except (RunNotFound, CorruptRun) as exc:
                log.error("run %s: cannot be woken (%s)", run.run_id, short(exc))
            except Exception as exc:
                log.warning("run %s: wake-up failed (%s); will retry", run.run_id,
                            type(exc).__name__)
                self.timers.retry_soon(run)

    # --- recovery and the read model ---------------------------------------------------------

    async def _recover(self) -> None:
        """Take up every unfinished run. One run that cannot be loaded is quarantined and
        logged; it never stops the others. A store that cannot list runs fails open()."""
        await self.storage.project()
        run_ids = [r for r in await self._runs_to_recover() if self._owns(r)]
        if run_ids:
            log.info("recovering %d unfinished runs", len(run_ids))
        gate = asyncio.Semaphore(16)

        async def recover_one(run_id: UUID) -> None:
            async with gate:
                try:
                    await self._take_up(run_id)
                except CorruptRun as exc:
                    log.error("quarantined: %s", exc)
                except StoreError:
                    raise  # the store itself failed: open() fails as a whole
                except Exception as exc:
                    problem = CorruptRun(run_id, f"cannot be recovered: {short(exc)}")
                    self.runs_table.quarantine(run_id, problem)
                    log.error("quarantined: %s", problem)

        outcomes = await asyncio.gather(*(recover_one(r) for r in run_ids),
                                        return_exceptions=True)  # every run gets its try
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome

    async def _runs_to_recover(self) -> list[UUID]:
        """Going runs that are not parked (a parked run waits in the store for its time)."""
        store, page, offset, found = self.storage.store, 500, 0, []
        while True:
            if self._parks(store):
                ids = await self.storage.call(store.runs_to_recover,  # type: ignore[attr-defined]
                                              -1.0, page, offset)
            else:  # a store without parking: every going run
                rows = await self.storage.call(
                    lambda o=offset: store.list_runs(status="running", limit=page, offset=o))
                ids = [row.run_id for row in rows]
            found += ids
            if len(ids) < page:
                return found
            offset += page

    # --- many engines: ownership, leases, the change feed --------------------------------------

    def _owns(self, run_id: UUID) -> bool:
        return self.ownership is None or self.ownership.owns(run_id)

    def _handing_over(self, run_id: UUID) -> bool:
        """The run's shard is being handed to another engine: start no new attempt here."""
        return bool(self._leaving) and self.ownership is not None and (
            self.ownership.shard(run_id) in self._leaving)

    async def _coordinate(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Leases and the change feed on threads of their own: a slow store never makes them
        wait behind reads, and they never hold up the readers."""
        if self._coordination is None:
            self._coordination = ThreadPoolExecutor(2, thread_name_prefix="rulebound-lease")
        return await asyncio.get_running_loop().run_in_executor(
            self._coordination, functools.partial(fn, *args, **kwargs))

    async def _claim_store(self, store: EventStore) -> None:
        """Take this engine's part of the store: its share of the shards on a store that
        leases them to many engines, or the store itself on one that takes one writer."""
        shards = getattr(store, "shards", None)
        if shards:
            self.ownership = Ownership(self.worker, shards, self._lease_time)
            self._feed_position = await self.storage.call(store.last_position)
            await self._lease_cycle(initial=True)  # our share first: recovery takes it up
            self._spawn(self._lease_loop())
            self._spawn(self._change_loop())
            self._spawn(self._drop_copies_loop(min(1.0, self._lease_time / 4)))
            return
        claim = getattr(store, "claim_writer", None)
        if claim is not None:
            await self.storage.call(claim, self.worker)

    async def _shared_admission(self, run: LiveRun, state: RunState, now: datetime
                                ) -> dict[str, datetime] | None:
        """On a store shared by several engines, rate limits hold across all of them: each
        attempt due on a rate-limited executor is admitted by the store (one round trip),
        before this engine's own window. Returns the steps refused, with when to try again."""
        claim = getattr(self.storage.store, "rate_claim", None)
        if self.ownership is None or claim is None:
            return None
        refused: dict[str, datetime] = {}
        for key, executor, tokens in self.dispatch.rate_limited_due(run, state, now):
            limit = self.registry.rate_limits[executor]
            wait = await self.storage.call(claim, executor, limit.per, limit.requests,
                                           limit.tokens, tokens)
            if wait > 0:
                refused[key] = now + timedelta(seconds=wait)
        return refused

    async def _lease_cycle(self, *, initial: bool = False) -> None:
        own = self.ownership
        assert own is not None and self._storage is not None
        now = asyncio.get_running_loop().time()
        for shard in own.surplus():
            self._leaving.setdefault(shard, now)
        # Hand a shard over once nothing runs in it here, or after half a lease of waiting.
        release = {s for s, since in self._leaving.items()
                   if not self._busy(s) or now - since > self._lease_time / 2}
        state = await self._coordinate(self._storage.store.lease_cycle,  # type: ignore[attr-defined]
                                       self.worker, self._lease_time, dict(own.held), release)
        gained, lost = own.apply(state)
        for shard in list(self._leaving):
            if shard not in own.held or shard in own.wanted:
                del self._leaving[shard]
        if lost:
            self._lose(lost)
        if gained and not initial:  # at open, recovery takes up what the first cycle gave
            self._spawn(self._take_up_shards(gained))

    async def _lease_loop(self) -> None:
        own = self.ownership
        assert own is not None
        interval = self._lease_time / 4
        while True:
            await asyncio.sleep(interval)
            try:
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for swallows a
                # cancellation that arrives as the cycle completes, and close() then waits
                # for this loop forever (seen as a hang of test_parking_races under load).
                async with asyncio.timeout(interval * 2):
                    await self._lease_cycle()
            except Exception as exc:
                log.warning("lease renewal failed (%s)", short(exc))
            if own.overdue():  # stop deciding before the leases can expire elsewhere
                lost = own.give_up()
                own.self_fenced += 1
                log.error("no lease renewal for %.1fs: this engine stops deciding for %d "
                          "shards until it renews", own.fence_after, len(lost))
                self._lose(lost)

    def _busy(self, shard: int) -> bool:
        own = self.ownership
        assert own is not None
        return any(run.attempts for run in self.runs_table.live.values()
                   if own.shard(run.run_id) == shard)

    def _lose(self, shards: set[int]) -> None:
        """These shards are another engine's now: their runs here become observed (kept for
        waiters and followers, fed by the change feed); their attempts are cancelled (the new
        owner abandons and re-runs them, without charging the step)."""
        own = self.ownership
        if own is None or not shards:
            return
        own.give_up(shards)
        for run in list(self.runs_table.live.values()):
            if own.shard(run.run_id) in shards:
                self.timers.cancel(run)
                for task in list(run.attempts.values()):
                    task.cancel()
                self.dispatch.waiting.pop(run.run_id, None)
                run.dirty = True

    async def _take_up_shards(self, shards: set[int]) -> None:
        """Shards just taken: drive their going runs (abandoning what their old owner ran)."""
        own = self.ownership
        assert own is not None
        try:
            await self.storage.project()
            found = [r for r in await self._runs_to_recover() if own.shard(r) in shards]
            # and the copies kept here while another engine owned them (for a request, a
            # waiter or a follower): the list above leaves out runs parked in the store
            listed = set(found)
            found += [r for r in list(self.runs_table.live) if own.shard(r) in shards
                      and r not in listed]
        except Exception as exc:
            log.warning("cannot list the runs of shards taken over (%s); the change feed "
                        "will bring them", short(exc))
            return
        for run_id in found:
            await self._drive(run_id)

    async def _drive(self, run_id: UUID) -> None:
        """Drive a going run of one of our shards: take it up, or reconcile the observed copy."""
        if not self._owns(run_id) or run_id in self.runs_table.finished:
            return
        try:
            run = self.runs_table.live.get(run_id)
            if run is None:
                async with self.runs_table.alone_with(run_id):
                    run = self.runs_table.live.get(run_id)
                    if run is None:
                        await self._take_up(run_id)
                        return
                # Taken up by someone else while we waited (a load that may have read the
                # log before what brought us here was appended): reload it, below.
            async with run.lock:
                if self.runs_table.live.get(run_id) is not run:
                    # parked (or replaced) while we waited: its row or its new object is
                    # what stands for it now; the poll or that object's holder drives it
                    return
                if self._parking:  # a copy kept here while another engine parked the run:
                    await self._unpark(run_id)  # that row would hide it from a takeover
                run.dirty = True
                run.reconcile = True
            await self._reconcile(run)
        except (RunNotFound, CorruptRun):
            pass
        except Exception as exc:
            log.warning("run %s: cannot take it up yet (%s)", run_id, short(exc))

    async def _change_loop(self) -> None:
        """The change feed: what other engines append reaches the runs here. The store says
        when something was appended (LISTEN/NOTIFY on PostgreSQL; a poll once a second while
        it cannot listen), and only then is the log read."""
        store = self.storage.store
        while True:
            try:
                if not await self._coordinate(store.wait_for_change,  # type: ignore[attr-defined]
                                              1.0):
                    continue
                notes = await self.storage.call(store.read_all, self._feed_position, 2000)
            except Exception as exc:
                log.warning("change feed: %s", short(exc))
                await asyncio.sleep(0.5)
                continue
            if not notes:
                continue
            self._feed_position = notes[-1].position
            newest: dict[UUID, int] = {}
            for note in notes:
                record = note.record
                if record.seq > newest.get(record.run_id, 0):
                    newest[record.run_id] = record.seq
            for run_id, seq in newest.items():
                run = self.runs_table.live.get(run_id)
                if run is None:
                    if self._owns(run_id) and run_id not in self.runs_table.finished:
                        self._spawn(self._drive(run_id))  # started by another replica
                    elif self.runs_table.busy(run_id):  # a copy loading: it may have read
                        self._spawn(self._catch_up_copy(run_id, seq))  # the log before this
                elif seq > run.state.version:
                    run.dirty = True
                    self._spawn(self._wake(run) if self._owns(run_id) else self._observe(run))

    async def _catch_up_copy(self, run_id: UUID, seq: int) -> None:
        """Another engine appended while a copy of its run was being loaded here: once the
        load is done, read what the load may have missed (else a waiter here never hears
        that the run ended)."""
        async with self.runs_table.alone_with(run_id):
            pass
        run = self.runs_table.live.get(run_id)
        if run is not None and seq > run.state.version:
            run.dirty = True
            await (self._wake(run) if self._owns(run_id) else self._observe(run))

    async def _observe(self, run: LiveRun) -> None:
        """Another engine's run moved: read what it wrote, for waiters and followers here."""
        async with run.lock:
            if run.state.terminal or not run.dirty:
                return
            with contextlib.suppress(Exception):
                await self._reload(run)

    # --- parked runs ---------------------------------------------------------------------------

    @staticmethod
    def _parks(store: Any) -> bool:
        return callable(getattr(store, "park", None))

    def _maybe_park(self, run: LiveRun) -> None:
        """Move a run out of memory if it has nothing to do for a while and nobody here is
        waiting on it; its due time goes to the store, which the poll reads back."""
        after = self._park_after
        current = asyncio.current_task()  # an attempt committing its own result is ending
        busy = any(task is not current for task in run.attempts.values())
        if (after is None or busy or run.waiters or run.watchers or run.held
                or run.timer_at is None or run.state.terminal or not self._driving
                or run.run_id in self.dispatch.waiting or not self._parking):
            return
        if (run.timer_at - self._clock.now()).total_seconds() < after:
            return
        self._spawn(self._park(run))

    async def _park(self, run: LiveRun) -> None:
        await asyncio.sleep(0)  # let an attempt that committed its result finish first
        async with run.lock:
            due = run.timer_at
            if (due is None or run.attempts or run.waiters or run.watchers or run.dirty
                    or run.state.terminal or self.runs_table.live.get(run.run_id) is not run
                    or not self._owns(run.run_id)):
                return
            store = self.storage.store
            try:
                await self.storage.call(store.park, run.run_id, _epoch(due),  # type: ignore[attr-defined]
                                        run.state.version)
                # Someone came while the parking was written, or another engine appended to
                # the run (the change feed marked it dirty and its wake-up waits for the
                # lock; or the append landed before the parking row, so the appender found
                # no parking to make due): the run stays, and the wake-up decides.
                moved = self.ownership is not None and bool(
                    await self.storage.read(run.run_id, run.state.version))
                if run.waiters or run.watchers or run.dirty or moved:
                    await self._unpark(run.run_id)
                    if moved and not run.dirty:
                        run.dirty = True
                        self._spawn(self._wake(run))
                    return
            except Exception as exc:
                log.debug("run %s: not parked (%s)", run.run_id, short(exc))
                # The row may be written: the run stays here, so take it away again (a row
                # left behind would hide the run from the next takeover's listing).
                with contextlib.suppress(Exception):
                    await self._unpark(run.run_id)
                return
            self.timers.cancel(run)
            self.runs_table.live.pop(run.run_id, None)
            self.parked += 1

    async def _unpark_due_loop(self) -> None:
        """Load parked runs whose time has come (their timers live in the store)."""
        store = self.storage.store
        interval = min(1.0, self._park_after or 1.0)
        while True:
            await asyncio.sleep(interval)
            try:
                due = await self.storage.call(store.parked_due,  # type: ignore[attr-defined]
                                              _epoch(self._clock.now()) + interval, 500)
            except Exception as exc:
                log.debug("parked runs: %s", short(exc))
                continue
            for run_id in due:
                if not self._owns(run_id):
                    continue
                run = self.runs_table.live.get(run_id)
                if run is not None:  # a copy kept here: drive it, or its parking lingers
                    self._spawn(self._resume_parked_copy(run))
                    continue
                try:
                    async with self.runs_table.alone_with(run_id):
                        await self._take_up(run_id)
                except RunNotFound:  # removed meanwhile (archived): forget its parking
                    with contextlib.suppress(Exception):
                        await self.storage.call(store.unpark, run_id)  # type: ignore[attr-defined]
                except Exception as exc:
                    log.warning("run %s: cannot wake it yet (%s)", run_id, short(exc))

    async def _unpark(self, run_id: UUID) -> None:
        """Remove a run's parking row (its timer in the store), as its owner. On a store
        shared by several engines the removal is fenced like an append: a former owner's
        (its shard taken over while the call was on its way) removes nothing, so the new
        owner still finds the row and wakes the run at its time."""
        store = self.storage.store
        if self.ownership is None:
            await self.storage.call(store.unpark, run_id)  # type: ignore[attr-defined]
        elif self.ownership.owns(run_id):
            await self.storage.call(store.unpark, run_id,  # type: ignore[attr-defined]
                                    self.ownership.fence(run_id))

    async def _drop_copies_loop(self, every: float) -> None:
        """Let go of runs kept here only for a request, a waiter or a follower while another
        engine owns them, once nobody here has used them for `_COPY_IDLE` seconds: the owner
        may keep such a run parked for days, and copies count against max_active_runs.

        Never one being taken up (its load may be on its way to a waiter) nor one used a
        moment ago: a wait registers on the copy it was handed without yielding, so a copy
        unused for that long has nobody on its way to it."""
        own = self.ownership
        assert own is not None
        while True:
            await asyncio.sleep(every)
            idle_since = time.monotonic() - _COPY_IDLE
            for run_id, run in list(self.runs_table.live.items()):
                if (run.used_at < idle_since and not own.owns(run_id) and not run.waiters
                        and not run.watchers and not run.attempts and not run.lock.locked()
                        and not self.runs_table.busy(run_id)
                        and run_id not in self.dispatch.waiting):
                    self.timers.cancel(run)
                    del self.runs_table.live[run_id]

    async def _expire_loop(self, keep_for: float) -> None:
        """Forget ended runs' final states once they are older than `keep_for`, also when no
        run ends any more (after a burst, the memory it took is let go)."""
        while True:
            await asyncio.sleep(max(0.05, min(5.0, keep_for / 2)))
            self.runs_table.expire()

    async def _resume_parked_copy(self, run: LiveRun) -> None:
        """A run parked in the store (its parking now due) that has a copy in memory here:
        one kept while another engine owned it, or one being parked right now."""
        async with run.lock:
            if self.runs_table.live.get(run.run_id) is not run or run.state.terminal:
                return  # parked away meanwhile: the next poll takes it up from the store
            try:
                if not self._owns(run.run_id):
                    return  # the new owner's poll takes it up from its parking row
                await self._unpark(run.run_id)
                if run.held or not self._owns(run.run_id):
                    return
                run.dirty = run.reconcile = True
                await self._commit(run, [])
            except Exception as exc:
                log.warning("run %s: cannot wake it yet (%s)", run.run_id, short(exc))

    def _poke_projector(self) -> None:
        if self._project_wanted is not None:
            self._project_wanted.set()

    async def _project_loop(self) -> None:
        assert self._project_wanted is not None
        while True:
            await self._project_wanted.wait()
            self._project_wanted.clear()
            try:
                await self.storage.project()
            except Exception as exc:
                log.warning("read model update failed (%s); will retry", type(exc).__name__)
            await asyncio.sleep(0.05)  # coalesce bursts of run starts and ends

    # --- helpers -------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self.state is not EngineState.OPEN:
            raise EngineClosed("the engine is not open; use `async with Engine(...)`")
        if self._read_only:
            raise EngineClosed("this engine is read-only: it inspects runs, it does not run "
                               "them")

    async def _live_or_none(self, run_id: UUID) -> LiveRun | None:
        """The live object of a going run, taking it up from the store if needed; None if
        the run has ended. RunNotFound if there is no such run."""
        run = self.runs_table.live.get(run_id)
        if run is None:
            if run_id in self.runs_table.quarantined:
                raise self.runs_table.quarantined[run_id]
            if run_id in self.runs_table.finished:
                return None
            async with self.runs_table.alone_with(run_id):
                run = await self._take_up(run_id)
        if run is not None:
            run.used_at = time.monotonic()
        return run

    async def _ended_state(self, run_id: UUID) -> RunState:
        state = self.runs_table.final_state(run_id)
        if state is None:
            state, _hash, _ = await self.runs_table.load(self.storage, run_id)
        return state

    def _check_live(self, run: LiveRun) -> None:
        if run.state.terminal:
            raise RunTerminal(f"run {run.run_id} has ended ({run.state.status})")
        if run.held:
            raise RunTerminal(run.held)

    def _view(self, run: LiveRun) -> RunView:
        return RunView.of(run.run_id, run.state, status="held" if run.held else None,
                          reason=run.held, waiting_for=_waiting_for(run.definition, run.state))


_tuple_new = tuple.__new__
# Events a request appends (anyone may append them; only the owner decides what follows).
_REQUEST_EVENTS = frozenset({"RunStarted", "SignalReceived", "CancelRequested"})


def _finished_request(requests: set[asyncio.Task[Any]]) -> Any:
    def done(task: asyncio.Task[Any]) -> None:
        requests.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: a caller that stopped waiting never sees it
    return done


def _epoch(when: datetime) -> float:
    return when.timestamp()


def _being_cancelled() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _forget_attempt(run: LiveRun, key: str) -> None:
    if run.attempts.get(key) is asyncio.current_task():
        del run.attempts[key]


def _waiting_for(definition: Workflow | None, state: RunState) -> tuple[str, ...]:
    """The signals the run's steps wait for now."""
    if definition is None or state.terminal:
        return ()
    return tuple(step.signal for st in state.steps.values()
                 if st.status == "waiting"
                 and isinstance(step := definition.step(st.name), WaitForSignal))


def _seen_signal(state: RunState, signal_id: str, name: str) -> bool:
    """Whether the run recorded a signal with this id (IdempotencyConflict if another name)."""
    recorded = state.signal_ids.get(signal_id)
    if recorded is None:
        return False
    if recorded != name:
        raise IdempotencyConflict(f"signal id {signal_id!r} was already used for signal "
                                  f"{recorded!r}, not {name!r}")
    return True


def _signal_payload(definition: Workflow, state: RunState, name: str, payload: Any) -> Any:
    """The payload of signal `name` checked against the step that will take it.

    That is the step waiting for it now, else the first step of the workflow that waits for
    that name; a name no step waits for is refused (it would be buffered for ever).
    """
    waits = [s for s in definition.steps if isinstance(s, WaitForSignal)
             and s.signal == name]
    if not waits:
        known = sorted({s.signal for s in definition.steps
                        if isinstance(s, WaitForSignal)})
        raise InvalidInput(f"workflow {definition.name!r} has no step waiting for signal "
                           f"{name!r}" + (f"; it waits for {', '.join(map(repr, known))}"
                                          if known else "; it waits for no signal"))
    waiting = {st.name for st in state.steps.values() if st.status == "waiting"}
    step = next((s for s in waits if s.name in waiting), waits[0])
    checked = validate(step.output, payload, f"signal {name!r}")
    _check_storable(checked, f"payload of signal {name!r}")
    return checked


def _check_position(after: object) -> None:
    """A sequence number from a caller: stores take 64-bit integers, events number from 1."""
    if type(after) is not int or not 0 <= after <= ev.MAX_INT:
        raise InvalidInput(f"after must be an integer from 0 to {ev.MAX_INT}, not {after!r}"[:200])


def _refuse(steps: list[tuple[str, str, str]], rule: str) -> None:
    """A DefinitionError naming every (workflow, step, executor) that breaks `rule`."""
    if steps:
        text = ", ".join(f"{s!r} of {w!r} (executor {e!r})" for w, s, e in steps)
        raise DefinitionError(f"{rule}: {text}")


def _uuid(value: UUID | str) -> UUID:
    if isinstance(value, UUID):
        return value
    try:
        return UUID(str(value))
    except ValueError:
        raise RunNotFound(f"{value!r} is not a run id") from None


def _check_storable(value: Any, what: str) -> None:
    problem = codec.check_json(value)
    if problem is not None:
        raise InvalidInput(f"{what} cannot be stored as JSON: {problem}")


def _decode_all(run_id: UUID, records: list[Record]) -> list[tuple[int, ev.Event]]:
    return [(r.seq, codec.decode(r.data, run_id=run_id, seq=r.seq)) for r in records]

