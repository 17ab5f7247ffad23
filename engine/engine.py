"""The Engine: an asyncio runtime that appends facts, asks the decider, and runs executors.

The path of a run reads straight: a request or an executor result becomes an event; the
engine folds it into the run's state, asks `advance` for the decisions, claims a dispatch
slot for every attempt that is due (its AttemptStarted goes into the SAME write, so the
start is durable before the executor is called), appends the whole batch, and only then
launches the executors. Every run has a lock; runs never wait for each other, and the
writes of many runs in the same moment share one transaction (engine.storage).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import secrets
import socket
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any
from uuid import UUID, uuid4, uuid5

from pydantic import BaseModel, ValidationError
from rulebound.domain import events as ev
from rulebound.domain.decider import advance, build_input, dispatchable, timers
from rulebound.domain.definitions import Step, WaitForSignal, Workflow
from rulebound.domain.errors import CorruptRun, DefinitionError, RunNotFound
from rulebound.domain.explain import explain as explain_events
from rulebound.domain.state import RunState, evolve

from . import codec
from .clock import Clock, SystemClock
from .errors import EngineClosed, InvalidInput, Overloaded, RunTerminal
from .executor import ExecutorContext, ExecutorError, Result, Task
from .metrics import EngineMetrics
from .ratelimit import Admission, RateLimit, SlidingWindow
from .registry import Registry
from .storage import StoreWorker
from .store import ConcurrencyConflict, EventStore, Record, RunRow, StoreError
from .stores import open_store
from .views import RunView

log = logging.getLogger("rulebound.engine")
RUN_NAMESPACE = UUID("5b1f0c3e-7a53-4f0e-9d7c-2f1d8d6a9e11")
_MESSAGE_LIMIT = 500
_REPLACED_RETRIES = 3  # signal/cancel: how often to follow a run whose object was replaced
# Seconds of commits one loop iteration may run before further commits wait for a later
# iteration (see Engine._turn): bounds the loop lag an embedding service sees under bursts.
_TURN = 0.002
_perf_counter = time.perf_counter  # a name of our own, so tests can drive the turn clock


@dataclass(slots=True)
class _Start:
    """An attempt claimed for dispatch: its event, and the rate-limit place it holds."""

    event: ev.AttemptStarted
    key: str
    limiter: SlidingWindow | None = None
    admission: Admission | None = None

    def release(self) -> None:
        if self.limiter is not None and self.admission is not None:
            self.limiter.release(self.admission)


class _Run:
    __slots__ = ("admit_at", "deadline_at", "definition", "dirty", "held", "id_text",
                 "last_hash", "lock", "run_id", "state", "tasks", "timer", "timer_at", "waiters",
                 "watchers")

    def __init__(self, run_id: UUID, definition: Workflow | None, state: RunState,
                 last_hash: str) -> None:
        self.run_id = run_id
        self.id_text = str(run_id)  # for idempotency keys: UUID.__str__ costs ~1.5 us a call
        self.definition = definition
        self.state = state
        self.last_hash = last_hash
        self.lock = asyncio.Lock()
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.waiters: list[asyncio.Future[None]] = []
        self.watchers: list[asyncio.Queue[tuple[int, ev.Event]]] = []
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at: datetime | None = None
        self.held: str | None = None
        self.dirty = False
        self.deadline_at: datetime | None = None
        self.admit_at: datetime | None = None  # when a rate limit may next admit an attempt


class Engine:
    """Run workflows durably. Use as `async with Engine(...) as engine:`.

    store: a URL (`memory://`, `sqlite:///path.db`, `postgresql://...`) or an EventStore.
    workflows / executors: what to run (or pass a `registry`).
    max_concurrency: attempts executing at once across all runs.
    max_active_runs: runs in flight before `start` answers Overloaded (backpressure).
    rate_limits: per executor name, requests and tokens per window; attempts wait for it.
    drain_timeout: on exit, how long running attempts may finish before being cancelled
      (a cancelled attempt is marked abandoned and retried by the next engine start).
    read_only: inspect a store (get, events, explain, runs) without running anything: no
      recovery, no executors needed; start, signal and cancel are refused.
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
        read_only: bool = False,
    ) -> None:
        self.registry = registry or Registry()
        for workflow in workflows:
            self.registry.add(workflow)
        self.registry.executors.update(executors or {})
        self.registry.rate_limits.update(rate_limits or {})
        self._store_spec = store
        self._clock = clock or SystemClock()
        self.worker = worker or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self._max_concurrency = max_concurrency
        self._free_slots = max_concurrency
        self._max_active = max_active_runs
        self._read_only = read_only
        self._recover_on_start = recover and not read_only
        self._drain_timeout = drain_timeout
        self._keep_finished = keep_finished
        self._runs: dict[UUID, _Run] = {}
        self._finished: OrderedDict[UUID, RunState] = OrderedDict()
        self._quarantined: dict[UUID, CorruptRun] = {}
        self._starting: dict[UUID, asyncio.Future[None]] = {}
        self._slot_waiters: OrderedDict[UUID, None] = OrderedDict()
        self._limiters: dict[str, SlidingWindow] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._context = ExecutorContext()
        self._storage: StoreWorker | None = None
        self._project_wanted: asyncio.Event | None = None
        self._closing = False
        self._open = False
        self.metrics = EngineMetrics()
        self._id_prefix = str(uuid4())[:24]  # "xxxxxxxx-xxxx-4xxx-yxxx-": version 4 kept
        self._id_count = 0
        self._limits: dict[str, dict[str, Any]] = {}
        self._turn_armed = False  # an _end_turn is scheduled for the next loop iteration
        self._turn_began: float | None = None  # when this turn's first commit began
        self._turn_last = 0.0  # when its latest commit began
        self._turn_commits = 0
        self._fit = 16  # queued commits let through per turn, measured on every turn
        self._deferred: deque[asyncio.Future[None]] = deque()

    # --- lifecycle ------------------------------------------------------------------------

    async def __aenter__(self) -> Engine:
        await self.open()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    async def open(self) -> None:
        if self._open:
            return
        missing = [] if self._read_only else self.registry.missing_executors()
        if missing:
            text = ", ".join(f"{e!r} (workflow {w!r})" for w, e in missing)
            raise DefinitionError(f"no executor registered for {text}")
        if not self._read_only:
            names = self.registry.names()
            self._check_token_rules(
                newest=[self.registry.latest(name) for name in names],
                older=[wf for name in names for wf in self.registry.versions(name)[:-1]])
        store = self._store_spec
        if isinstance(store, str):
            store = await asyncio.get_running_loop().run_in_executor(None, open_store, store)
        self._storage = StoreWorker(store)
        self._storage.start()
        self._limiters = {k: SlidingWindow(v) for k, v in self.registry.rate_limits.items()}
        for executor in () if self._read_only else self.registry.executors.values():
            opener = getattr(executor, "open", None)
            if opener is not None:
                await opener(self._context)
        self._project_wanted = asyncio.Event()
        self._spawn(self._project_loop())
        self._open = True
        if self._recover_on_start:
            await self._recover()

    async def close(self) -> None:
        """Stop starting attempts, let running ones finish (up to drain_timeout), flush."""
        if not self._open or self._closing:
            return
        self._closing = True
        in_flight = [t for run in self._runs.values() for t in run.tasks.values()]
        if in_flight:
            _done, pending = await asyncio.wait(in_flight, timeout=self._drain_timeout)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        for run in self._runs.values():
            if run.timer is not None:
                run.timer.cancel()
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        assert self._storage is not None
        with contextlib.suppress(Exception):
            await self._storage.project()
        for executor in self.registry.executors.values():
            closer = getattr(executor, "close", None)
            if closer is not None:
                with contextlib.suppress(Exception):
                    await closer()
        await self._context.aclose()
        await self._storage.close()
        self._open = False

    def _next_id(self) -> str:
        """A unique event id (UUID text): a random per-engine prefix plus a counter.

        The 74 random bits of the prefix make two engines' ids collide no more often than
        uuid4s would, and there is no system call or UUID object per event.
        """
        self._id_count += 1
        return f"{self._id_prefix}{self._id_count:012x}"

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    @property
    def storage(self) -> StoreWorker:
        if self._storage is None or not self._open:
            raise EngineClosed("the engine is not open; use `async with Engine(...)`")
        return self._storage

    # --- the facade ---------------------------------------------------------------------

    async def start(self, workflow: str, input: Any = None, idempotency_key: str | None = None
                    ) -> UUID:
        """Start a run of the newest version of `workflow`; the same key gives the same run."""
        return (await self.start_run(workflow, input, idempotency_key))[0]

    async def start_run(self, workflow: str, input: Any = None,
                        idempotency_key: str | None = None) -> tuple[UUID, bool]:
        """`start`, also saying whether this call created the run (False: key seen before)."""
        self._check_open()
        definition = self.registry.latest(workflow)
        checked = _validate(definition.input_schema, input, f"input of {workflow!r}")
        _check_storable(checked, f"input of {workflow!r}")
        if idempotency_key is not None:
            run_id = uuid5(RUN_NAMESPACE, f"{workflow}\x00{idempotency_key}")
            async with self._alone_with(run_id):  # one creator per key at a time
                if run_id in self._runs or run_id in self._finished:
                    return run_id, False
                if await self.storage.read(run_id, 0):
                    await self._adopt(run_id)
                    return run_id, False
                created = await self._create(run_id, definition, checked, idempotency_key)
            return run_id, created
        run_id = uuid4()
        await self._create(run_id, definition, checked, None)
        return run_id, True

    async def _create(self, run_id: UUID, definition: Workflow, input: Any,
                      key: str | None) -> bool:
        if len(self._runs) >= self._max_active:
            raise Overloaded(f"{len(self._runs)} runs in flight (max_active_runs)", 1.0)
        run = _Run(run_id, definition, RunState(), codec.GENESIS_HASH)
        self._runs[run_id] = run
        started = ev.RunStarted(
            at=self._clock.now(), workflow=definition.name, definition_hash=definition.hash,
            input=input, limits=self._limits_of(definition), idempotency_key=key,
            seed=secrets.randbits(63))
        try:
            async with run.lock:
                await self._commit(run, [started])
        except ConcurrencyConflict:
            # Another engine created the same idempotent run first: adopt what it wrote, and
            # hand over whoever already waits for this run.
            self._runs.pop(run_id, None)
            run.dirty = True
            adopted = await self._adopt(run_id)
            self._hand_over_waiters(run, adopted)
            return False
        except BaseException:
            if run.state.version == 0:
                self._forget_unstarted(run)
            raise
        return True

    def _forget_unstarted(self, run: _Run) -> None:
        """A start that failed or was cancelled before its first write was confirmed.

        Callers already waiting on this object must not act on it: a signal or cancel on its
        lock follows the run to whatever stands for it now (`_live_run`), a `wait` is handed
        over. If the write was handed to the store it may still land; then the run exists,
        and this engine, which wrote it, takes it up once the writer has settled it.
        """
        self._runs.pop(run.run_id, None)
        may_have_landed = run.dirty
        run.dirty = True
        if may_have_landed and not self._closing:
            self._spawn(self._take_up_if_stored(run))
        else:
            self._hand_over_waiters(run, None)

    async def _take_up_if_stored(self, old: _Run) -> None:
        run_id = old.run_id
        run: _Run | None = None
        try:
            async with self._alone_with(run_id):  # no start of the same key meanwhile
                await self.storage.barrier()  # every write handed over before is settled
                run = await self._adopt(run_id)
        except RunNotFound:
            pass  # the write did not land: there is no run
        except Exception as exc:
            log.warning("run %s: cannot check whether its cancelled start landed (%s); the "
                        "next engine start recovers it if it did", run_id, type(exc).__name__)
        finally:
            self._hand_over_waiters(old, run)
        if run is not None and not run.held:
            await self._resume(run)

    @contextlib.asynccontextmanager
    async def _alone_with(self, run_id: UUID) -> AsyncIterator[None]:
        """Wait until nobody else is creating or taking up `run_id`, then keep others out."""
        while run_id in self._starting:
            await asyncio.shield(self._starting[run_id])
        settled: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._starting[run_id] = settled
        try:
            yield
        finally:
            del self._starting[run_id]
            settled.set_result(None)

    def _hand_over_waiters(self, old: _Run, new: _Run | None) -> None:
        """Callers waiting for a run whose first write failed wait on the object that now
        stands for it, or, if there is none, wake to find out (RunNotFound or its end)."""
        waiters = [w for w in old.waiters if not w.done()]
        old.waiters.clear()
        if new is not None and not new.state.terminal and not new.held:
            new.waiters.extend(waiters)
            return
        for waiter in waiters:
            waiter.set_result(None)

    def _limits_of(self, definition: Workflow) -> dict[str, Any]:
        """`definition.limits.model_dump()`, dumped once per definition (a fresh copy each)."""
        dumped = self._limits.get(definition.hash)
        if dumped is None:
            dumped = self._limits[definition.hash] = definition.limits.model_dump()
        return dict(dumped)

    async def get(self, run_id: UUID | str) -> RunView:
        run_id = _uuid(run_id)
        run = self._runs.get(run_id)
        if run is not None:
            return self._view(run)
        if run_id in self._quarantined:
            raise self._quarantined[run_id]
        state = self._finished.get(run_id)
        if state is None:
            state, _hash = await self._load_state(run_id)
        return RunView.of(run_id, state)

    async def wait(
        self,
        run_id: UUID | str,
        timeout: float | None = None,  # noqa: ASYNC109 (fixed by the facade contract)
    ) -> RunView:
        """Wait until the run ends (or is held); raises TimeoutError after `timeout` s."""
        run_id = _uuid(run_id)
        run = self._runs.get(run_id)
        if run is None or run.state.terminal or run.held:
            return await self.get(run_id)
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        run.waiters.append(waiter)
        try:
            # No shield: the waiter is this call's own future (nobody else awaits it, and
            # _finish skips done ones), so cancelling it with the caller is harmless, and a
            # shield costs a future and an extra loop hop per wait.
            await asyncio.wait_for(waiter, timeout)
        finally:
            if waiter in run.waiters:
                run.waiters.remove(waiter)
        return await self.get(run_id)

    async def events(self, run_id: UUID | str, after: int = 0) -> list[ev.Event]:
        """The run's events in order (event n has sequence number n)."""
        run_id = _uuid(run_id)
        _check_position(after)
        records = await self.storage.read(run_id, after)
        if not records and after == 0:
            raise RunNotFound(f"no run {run_id}")
        return await self.storage.call(_decode_all, run_id, records)

    async def watch(self, run_id: UUID | str, after: int = 0) -> AsyncIterator[ev.Event]:
        """Events after sequence `after`, then new ones as they are appended, until the end."""
        run_id = _uuid(run_id)
        _check_position(after)
        run = self._runs.get(run_id)
        queue: asyncio.Queue[tuple[int, ev.Event]] = asyncio.Queue()
        if run is not None:
            run.watchers.append(queue)
        try:
            seen = after
            records = await self.storage.read(run_id, after)
            if not records and after == 0 and run is None:
                raise RunNotFound(f"no run {run_id}")
            for event in await self.storage.call(_decode_all, run_id, records):
                seen += 1
                yield event
                if event.type in ev.TERMINAL_EVENTS:
                    return
            if run is None:
                return
            while True:
                seq, event = await queue.get()
                if seq <= seen:
                    continue
                seen = seq
                yield event
                if event.type in ev.TERMINAL_EVENTS:
                    return
        finally:
            if run is not None and queue in run.watchers:
                run.watchers.remove(queue)

    async def signal(self, run_id: UUID | str, name: str, payload: Any = None) -> None:
        async with self._live_run(_uuid(run_id)) as run:
            if run.definition is not None:
                for st in run.state.steps.values():
                    step = run.definition.step(st.name) if st.parent is None else None
                    if st.status == "waiting" and isinstance(step, WaitForSignal) and (
                        step.signal == name
                    ):
                        payload = _validate(step.output, payload, f"signal {name!r}")
            _check_storable(payload, f"payload of signal {name!r}")
            await self._commit(run, [ev.SignalReceived(at=self._clock.now(), name=name,
                                                       payload=payload)])

    async def cancel(self, run_id: UUID | str, reason: str = "cancelled") -> None:
        async with self._live_run(_uuid(run_id)) as run:
            await self._commit(run, [ev.CancelRequested(at=self._clock.now(), reason=reason)])

    @contextlib.asynccontextmanager
    async def _live_run(self, run_id: UUID) -> AsyncIterator[_Run]:
        """The engine's object for a live run, with its lock held.

        If the run's start failed while we waited for the lock, that object is no longer the
        engine's (the run was never written, or another object now stands for it): follow it.
        """
        for _ in range(_REPLACED_RETRIES):
            run = await self._active(run_id)
            async with run.lock:
                if self._runs.get(run_id) is not run and not run.state.terminal:
                    continue
                self._check_live(run)
                yield run
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
        """
        known = self.registry.by_hash(workflow.hash) is not None
        if not self._read_only and not (known and not newest):  # the same rules as at open
            if newest or not self.registry.versions(workflow.name):
                self._check_token_rules(newest=[workflow], older=[])
            else:
                self._check_token_rules(newest=[], older=[workflow])
        self.registry.add(workflow, newest=newest)
        for run in list(self._runs.values()):
            if run.held and run.state.definition_hash == workflow.hash:
                run.held = None
                run.definition = workflow
                self._spawn(self._resume(run))

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
    def active_runs(self) -> int:
        return len(self._runs)

    @property
    def saturation(self) -> float:
        """Busy fraction of the run capacity (for backpressure and /metrics)."""
        return len(self._runs) / self._max_active

    # --- the core: fold, decide, claim, append, launch ---------------------------------------

    async def _commit(self, run: _Run, triggers: list[ev.Event]) -> None:
        """Append `triggers` and everything they lead to, atomically. Caller holds run.lock."""
        waiter = self._turn()
        if waiter is not None:
            await waiter  # let through by _end_turn: this iteration's turn counts it
            self._count_commit(_perf_counter())
        if run.dirty:
            await self._reload(run)
        if run.definition is None or run.held:
            return
        if run.state.terminal:
            return
        now = self._clock.now()
        state = run.state
        if not triggers:
            # A wake-up with no new fact: time itself is the trigger. Record which timers
            # came due, so every batch of decisions in the log follows the fact it answers.
            triggers = [ev.TimerFired(at=now, timer=name)
                        for when, name in timers(run.definition, state) if when <= now]
        for event in triggers:
            state = evolve(state, event)
        decided, state = advance(run.definition, state, now)
        claimed, state = self._claim(run, state, now)
        batch: list[ev.Event] = [*triggers, *decided, *(c.event for c in claimed)]
        if not batch:
            self._arm_timer(run, now=now)  # nothing was written: `now` is current
            if self._slot_waiters and self._free_slots > 0:
                self._wake_slot_waiters()
            return
        records: list[Record] = []
        stamps: list[tuple[str, str]] = []
        prev = run.last_hash
        seq = run.state.version
        run_id = run.run_id
        stamp = codec.stamp
        # `_next_id` and Record's Python-level __new__ inlined: five events per step.
        prefix, count = self._id_prefix, self._id_count
        for event in batch:
            seq += 1
            count += 1
            event_id = f"{prefix}{count:012x}"
            prev, data = stamp(event, event_id, prev)
            stamps.append((event_id, prev))
            records.append(_tuple_new(Record, (run_id, seq, event.type, data)))
        self._id_count = count
        try:
            await self.storage.append(records)
        except BaseException:
            for start in claimed:
                start.release()
                self._release_slot()
            run.dirty = True  # the write may or may not have landed: read back before use
            raise
        run.state = state
        run.last_hash = prev
        self.metrics.commits += 1
        self._after_commit(run, batch, stamps, claimed)

    def _turn(self) -> asyncio.Future[None] | None:
        """None to commit now, or a future to await first: fairness for the event loop.

        asyncio runs every callback that is ready at the start of an iteration before it looks
        at timers and sockets again. When 200 runs' results arrive together, committing all of
        them in one iteration stalls everything else on the loop (an embedding service's HTTP
        handlers, its timers) for 20 ms or more. So commits stop going straight through once
        `_TURN` seconds have passed since the iteration's first; later ones queue in order and
        are let through about a turn's worth per iteration (as many as the last turn's own
        commits say fit). A quiet loop never waits: the first commit of an iteration goes.
        """
        if not self._turn_armed:  # the first commit of this loop iteration
            self._turn_armed = True
            asyncio.get_running_loop().call_soon(self._end_turn)
        if self._deferred:  # others wait already: queue behind them
            return self._defer()
        now = _perf_counter()
        if self._turn_began is not None and now - self._turn_began > _TURN:
            return self._defer()
        self._count_commit(now)
        return None

    def _defer(self) -> asyncio.Future[None]:
        waiter = asyncio.get_running_loop().create_future()
        self._deferred.append(waiter)
        return waiter

    def _count_commit(self, now: float) -> None:
        """A commit of this turn begins at `now` (what _end_turn measures the turn by)."""
        if self._turn_began is None:
            self._turn_began = now
        self._turn_last = now
        self._turn_commits += 1

    def _end_turn(self) -> None:
        """At the next loop iteration (timers and I/O have had their turn): let the next
        queued commits through, as many as fit in a turn, and keep turning while any wait."""
        began, commits = self._turn_began, self._turn_commits
        if began is not None and commits > 1 and self._turn_last > began:
            # Measured from this turn's own commits: the ones let through run back to back.
            per_commit = (self._turn_last - began) / (commits - 1)
            self._fit = max(1, min(1024, 1 + int(_TURN / per_commit)))
        elif self._deferred and commits == 1:
            self._fit = min(1024, self._fit * 2)  # nothing to measure: probe upwards
        self._turn_armed = False
        self._turn_began = None
        self._turn_commits = 0
        released = 0
        deferred = self._deferred
        while deferred and released < self._fit:
            waiter = deferred.popleft()
            if not waiter.done():  # skip a caller that was cancelled meanwhile
                waiter.set_result(None)
                released += 1
        if deferred:  # the ones let through run in the next iteration: turn again after it
            self._turn_armed = True
            asyncio.get_running_loop().call_soon(self._end_turn)

    def _claim(self, run: _Run, state: RunState, now: datetime
               ) -> tuple[list[_Start], RunState]:
        """Take dispatch slots (and rate-limit room) for attempts that are due now."""
        claimed: list[_Start] = []
        run.admit_at = None
        if self._closing or state.terminal or run.definition is None:
            return claimed, state
        for st in dispatchable(state):
            if st.not_before is not None and st.not_before > now:
                continue
            if self._free_slots <= 0:
                self._slot_waiters[run.run_id] = None
                break
            task = run.definition.task(st.name)
            limiter = self._limiters.get(task.executor)
            admission = None
            if limiter is not None:
                wait, admission = limiter.try_acquire(self._clock.monotonic(),
                                                      st.max_tokens or 0)
                if admission is None:  # the timer armed after this commit wakes the run
                    when = now + timedelta(seconds=wait)
                    if run.admit_at is None or when < run.admit_at:
                        run.admit_at = when
                    continue
            self._free_slots -= 1
            deadline = now + _seconds(task.timeout)
            run_deadline = run.deadline_at  # a run's start and deadline never change
            if run_deadline is None:
                assert state.started_at is not None
                run_deadline = run.deadline_at = state.started_at + timedelta(
                    seconds=state.limits["deadline"])
            started = ev.trusted(
                ev.AttemptStarted, at=now, step=st.key, attempt=st.attempt,
                executor=task.executor, worker=self.worker, deadline=min(deadline, run_deadline))
            state = evolve(state, started)
            claimed.append(_Start(started, st.key, limiter, admission))
        return claimed, state

    def _after_commit(self, run: _Run, batch: list[ev.Event], stamps: list[tuple[str, str]],
                      claimed: list[_Start]) -> None:
        first_seq = run.state.version - len(batch) + 1
        if run.watchers:
            stamped = [codec.stamped(e, i, h) for e, (i, h) in zip(batch, stamps, strict=True)]
            for queue in run.watchers:
                for n, event in enumerate(stamped):
                    queue.put_nowait((first_seq + n, event))
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
        for start in claimed:
            task = asyncio.get_running_loop().create_task(self._execute(run, start))
            run.tasks[start.key] = task
        self._arm_timer(run)  # after the write: read the clock again

    def _finish(self, run: _Run) -> None:
        if run.timer is not None:
            run.timer.cancel()
            run.timer = None
        current = asyncio.current_task()
        for task in run.tasks.values():
            if task is not current:
                task.cancel()  # a cancelled run or a deadline: in-flight results are unwanted
        for waiter in run.waiters:
            if not waiter.done():
                waiter.set_result(None)
        run.waiters.clear()
        self._runs.pop(run.run_id, None)
        self._slot_waiters.pop(run.run_id, None)
        self._finished[run.run_id] = run.state
        while len(self._finished) > self._keep_finished:
            self._finished.popitem(last=False)

    async def _execute(self, run: _Run, start: _Start) -> None:
        """Run one attempt, then feed its result back as an event."""
        definition = run.definition
        assert definition is not None
        st = run.state.steps[start.key]
        step = definition.task(st.name)
        event: ev.Event
        began = self._clock.monotonic()
        try:
            task = Task(
                run_id=run.run_id, step=start.key, attempt=st.attempt,
                idempotency_key=f"{run.id_text}:{start.key}:{st.visit}",
                input=build_input(definition, run.state, start.key), config=step.config,
                output_schema=step.output, timeout=step.timeout,
                deadline=start.event.deadline, max_tokens=st.max_tokens, max_cost=st.max_cost)
            event = await self._call(step, task, start, began)
        except asyncio.CancelledError:
            start.release()  # no-op once the call was made
            self._release_slot()
            run.tasks.pop(start.key, None)
            raise
        except Exception as exc:  # a bug in building the task: record it, never crash the loop
            event = self._failure(start, "error", _short(exc), False, began)
        self._release_slot()
        try:
            async with run.lock:
                current = run.state.steps.get(start.key)
                if (run.state.terminal or current is None or current.status != "running"
                        or current.attempt != start.event.attempt):
                    return  # a late result for an attempt the run no longer waits for
                await self._commit_retrying(run, [event])
        finally:
            run.tasks.pop(start.key, None)

    async def _call(self, step: Step, task: Task, start: _Start, began: float) -> ev.Event:
        executor = self.registry.executors[step.executor]
        budget = (task.deadline - self._clock.now()).total_seconds()
        if start.limiter is not None and start.admission is not None:
            start.limiter.called(start.admission, self._clock.monotonic())
        try:
            async with asyncio.timeout(max(0.0, budget)):
                result = await executor(task)
        except TimeoutError:
            # Cancelled at the deadline: what the executor reported round by round is all we
            # know of its spend, and it must reach the log (the budget is a fold of facts).
            spent = _spent(task)
            self._check_grant(step, task, spent)
            return self._failure(start, "timeout", f"no result within {step.timeout:g}s",
                                 True, began, usage=spent)
        except ExecutorError as exc:
            retry_after = (self._clock.now() + timedelta(seconds=exc.retry_after)
                           if exc.retry_after is not None else None)
            usage = exc.usage if exc.usage != ev.NO_USAGE else _spent(task)
            self._check_grant(step, task, usage)
            return self._failure(start, exc.kind, exc.message[:_MESSAGE_LIMIT], exc.retryable,
                                 began, usage=usage, retry_after=retry_after)
        except Exception as exc:
            return self._failure(start, "error", _short(exc), False, began,
                                 usage=_spent(task))
        if isinstance(result, Result):
            output, usage = result.output, result.usage
        else:  # a bare output: skip building a Result and a default Usage per attempt
            output, usage = result, ev.NO_USAGE
        if type(usage) is not ev.Usage:  # events below are built unvalidated: check it here
            try:
                usage = ev.Usage.model_validate(usage)
            except ValidationError as exc:
                return self._failure(start, "error", "executor reported invalid usage: "
                                     + _validation_summary(exc), False, began)
        if step.output is not None:
            try:
                output = step.output.model_validate(output).model_dump(mode="json")
            except ValidationError as exc:
                self._check_grant(step, task, usage)
                return self._failure(start, "invalid_output", _validation_summary(exc), True,
                                     began, usage=usage)
        problem = codec.check_json(output)
        if problem is not None:
            return self._failure(start, "invalid_output", f"output cannot be stored: {problem}",
                                 True, began, usage=usage)
        self._check_grant(step, task, usage)
        if start.limiter is not None and start.admission is not None:
            start.limiter.settle(start.admission, usage.tokens)
        return ev.trusted(
            ev.AttemptSucceeded, at=self._clock.now(), step=task.step, attempt=task.attempt,
            output=output, usage=usage, latency=round(self._clock.monotonic() - began, 6))

    def _check_grant(self, step: Step, task: Task, usage: ev.Usage) -> None:
        """Usage is recorded as reported (the spend happened), but an executor that overruns
        the grant it was told breaks the budget guarantee: make it loud."""
        if (task.max_tokens is not None and usage.tokens_in + usage.tokens_out > task.max_tokens
                ) or (task.max_cost and usage.cost > task.max_cost + 1e-9):
            self.metrics.grant_overruns += 1
            log.warning("executor %r overran its grant on %s attempt %d: %d tokens, $%.6f "
                        "(granted %s tokens, $%s)", step.executor, task.step, task.attempt,
                        usage.tokens, usage.cost, task.max_tokens, task.max_cost)

    def _failure(self, start: _Start, kind: str, message: str, retryable: bool, began: float,
                 *, usage: ev.Usage | None = None, retry_after: datetime | None = None
                 ) -> ev.AttemptFailed:
        return ev.AttemptFailed(
            at=self._clock.now(), step=start.key, attempt=start.event.attempt, error_type=kind,
            message=message, retryable=retryable, usage=usage or ev.NO_USAGE,
            latency=round(self._clock.monotonic() - began, 6), retry_after=retry_after)

    async def _commit_retrying(self, run: _Run, triggers: list[ev.Event]) -> None:
        """Commit an executor's result; a failed write is settled by reloading, then retried."""
        delay = 0.05
        for attempt in range(8):
            try:
                await self._commit(run, triggers)
                return
            except (StoreError, ConcurrencyConflict) as exc:
                log.warning("run %s: write failed (%s); reloading", run.run_id,
                            type(exc).__name__)
                await asyncio.sleep(delay * (attempt + 1))
                await self._reload(run)
                if run.state.terminal or any(
                    run.state.steps.get(t.step) is None  # type: ignore[attr-defined]
                    or run.state.steps[t.step].status != "running"  # type: ignore[attr-defined]
                    for t in triggers
                ):
                    return  # the result landed after all, or the run moved on
        log.error("run %s: giving up on a write; the attempt will be retried on restart",
                  run.run_id)

    def _release_slot(self) -> None:
        self._free_slots += 1
        self._wake_slot_waiters()

    def _wake_slot_waiters(self) -> None:
        """Wake as many runs waiting for a dispatch slot as there are free slots.

        A woken run that cannot use its slot after all (its rate limit says wait, or another
        run took it first) queues again; waking one per free slot on every commit, not only
        when a slot is released, means a slot never sits free while runs wait for one.
        """
        woken = 0
        while self._slot_waiters and woken < self._free_slots:
            run_id, _ = self._slot_waiters.popitem(last=False)
            run = self._runs.get(run_id)
            if run is not None:
                self._spawn(self._wake(run))
                woken += 1

    # --- time ----------------------------------------------------------------------------

    def _arm_timer(self, run: _Run, at: datetime | None = None, *,
                   now: datetime | None = None) -> None:
        """Wake the run at its next due time (a not-before, a signal timeout, the deadline)."""
        state = run.state
        if run.definition is None or state.terminal or self._closing:
            return
        # The same moments as `timers()` plus the attempts' not-before times, in one pass over
        # the steps: this runs after every commit, and the run's deadline never changes. While
        # the run waits for a dispatch slot (a freed slot wakes it) or for its rate limit
        # (`admit_at`), an attempt that is already due is left out: a timer for its past
        # not-before time would wake the run in a busy loop.
        due = run.deadline_at
        if due is None:
            if state.started_at is None:
                return
            due = run.deadline_at = state.started_at + timedelta(
                seconds=state.limits["deadline"])
        if now is None:
            now = self._clock.now()
        blocked = run.admit_at is not None or run.run_id in self._slot_waiters
        if run.admit_at is not None and run.admit_at < due:
            due = run.admit_at
        for st in state.steps.values():
            status = st.status
            if status == "scheduled":
                if st.not_before is not None and st.not_before < due and (
                        not blocked or st.not_before > now):
                    due = st.not_before
            elif status == "waiting" and st.waiting_since is not None:
                step = run.definition.step(st.name)
                assert isinstance(step, WaitForSignal)
                when = st.waiting_since + timedelta(seconds=step.timeout)
                if when < due:
                    due = when
        if at is not None and at < due:
            due = at
        if run.timer is not None:
            if due == run.timer_at:
                return  # already armed for that moment
            run.timer.cancel()
            run.timer = None
        run.timer_at = due
        if due is None:
            return
        delay = max(0.0, (due - now).total_seconds())
        run.timer = asyncio.get_running_loop().call_later(delay, self._on_timer, run)

    def _on_timer(self, run: _Run) -> None:
        run.timer = None
        run.timer_at = None
        if not self._closing:
            self._spawn(self._wake(run))

    async def _wake(self, run: _Run) -> None:
        async with run.lock:
            if run.definition is None or run.state.terminal or self._closing:
                return
            try:
                await self._commit(run, [])  # adds TimerFired for whatever came due
            except Exception as exc:
                log.warning("run %s: wake-up failed (%s); will retry", run.run_id,
                            type(exc).__name__)
                self._arm_timer(run, self._clock.now() + timedelta(seconds=1))

    # --- loading, recovery, read model ------------------------------------------------------

    async def _load_state(self, run_id: UUID) -> tuple[RunState, str]:
        try:
            return await self.storage.call(self._load_sync, run_id)
        except CorruptRun as exc:
            self._quarantined[run_id] = exc
            raise

    def _load_sync(self, run_id: UUID) -> tuple[RunState, str]:
        """Read, decode and fold a run on a reader thread (CPU work stays off the loop)."""
        records = self.storage.store.read(run_id, 0)
        if not records:
            raise RunNotFound(f"no run {run_id}")
        state = RunState()
        last_hash = codec.GENESIS_HASH
        for expected, record in enumerate(records, start=1):
            if record.seq != expected:
                raise CorruptRun(run_id, f"event {expected} is missing", seq=expected)
            event = codec.decode(record.data, run_id=run_id, seq=record.seq)
            try:
                state = evolve(state, event)
            except Exception as exc:
                raise CorruptRun(run_id, f"cannot fold {event.type}: {exc}",
                                 seq=record.seq) from exc
            last_hash = event.hash or last_hash
        return state, last_hash

    async def _adopt(self, run_id: UUID) -> _Run | None:
        """Load a run from the store and take charge of it if it is still going."""
        if run_id in self._runs:
            return self._runs[run_id]
        state, last_hash = await self._load_state(run_id)
        if run_id in self._runs:  # adopted by someone else while we read
            return self._runs[run_id]
        if state.terminal:
            self._finished[run_id] = state
            return None
        definition = self.registry.by_hash(state.definition_hash)
        run = _Run(run_id, definition, state, last_hash)
        if definition is None:
            run.held = (f"run {run_id} is held: workflow {state.workflow!r} version "
                        f"{state.definition_hash[:12]} is not registered; register that "
                        "version to resume it (register(..., newest=False) keeps new runs "
                        "on the current version)")
            log.warning(run.held)
        self._runs[run_id] = run
        return run

    async def _reload(self, run: _Run) -> None:
        state, last_hash = await self._load_state(run.run_id)
        run.state, run.last_hash, run.dirty = state, last_hash, False
        if state.terminal:
            self._finish(run)

    async def _resume(self, run: _Run) -> None:
        """After a restart: attempts that were started and never finished are abandoned."""
        async with run.lock:
            if run.dirty:  # see what is really stored before deciding what was abandoned
                await self._reload(run)
            now = self._clock.now()
            abandoned: list[ev.Event] = [
                ev.AttemptAbandoned(at=now, step=st.key, attempt=st.attempt,
                                    why="engine restarted before the attempt reported")
                for st in run.state.steps.values()
                if st.status == "running" and st.kind == "task" and st.key not in run.tasks
            ]
            await self._commit(run, abandoned)

    async def _recover(self) -> None:
        await self.storage.project()
        offset, page = 0, 500
        run_ids: list[UUID] = []
        while True:
            rows = await self.storage.call(
                lambda o=offset: self.storage.store.list_runs(status="running", limit=page,
                                                              offset=o))
            run_ids += [row.run_id for row in rows]
            if len(rows) < page:
                break
            offset += page
        if run_ids:
            log.info("recovering %d unfinished runs", len(run_ids))
        gate = asyncio.Semaphore(16)

        async def recover_one(run_id: UUID) -> None:
            async with gate:
                try:
                    run = await self._adopt(run_id)
                except CorruptRun as exc:
                    log.error("quarantined: %s", exc)
                    return
                if run is not None and not run.held:
                    await self._resume(run)

        await asyncio.gather(*(recover_one(r) for r in run_ids))

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
        if not self._open or self._closing:
            raise EngineClosed("the engine is not open; use `async with Engine(...)`")
        if self._read_only:
            raise EngineClosed("this engine is read-only: it inspects runs, it does not run "
                               "them")

    async def _active(self, run_id: UUID) -> _Run:
        self._check_open()
        run = self._runs.get(run_id)
        if run is not None:
            self._check_live(run)
            return run
        if run_id in self._quarantined:
            raise self._quarantined[run_id]
        state = self._finished.get(run_id)
        if state is None:
            state, _ = await self._load_state(run_id)
            if not state.terminal:  # stored and going, but not (yet) held here: take it up
                adopted = await self._adopt(run_id)
                if adopted is not None:
                    self._check_live(adopted)
                    return adopted
                state = self._finished.get(run_id, state)
        raise RunTerminal(f"run {run_id} has ended ({state.status})")

    def _check_live(self, run: _Run) -> None:
        if run.state.terminal:
            raise RunTerminal(f"run {run.run_id} has ended ({run.state.status})")
        if run.held:
            raise RunTerminal(run.held)

    def _view(self, run: _Run) -> RunView:
        waiting = tuple(
            step.signal for st in run.state.steps.values()
            if st.status == "waiting" and run.definition is not None
            and isinstance(step := run.definition.step(st.name), WaitForSignal))
        return RunView.of(run.run_id, run.state, status="held" if run.held else None,
                          reason=run.held, waiting_for=waiting)


_tuple_new = tuple.__new__


@functools.lru_cache(maxsize=256)
def _seconds(seconds: float) -> timedelta:
    """A step timeout as a timedelta (a handful of distinct values, asked per attempt)."""
    return timedelta(seconds=seconds)


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


def _validate(schema: type[BaseModel] | None, value: Any, what: str) -> Any:
    if schema is None:
        return value
    try:
        return schema.model_validate(value).model_dump(mode="json")
    except ValidationError as exc:
        raise InvalidInput(f"{what}: {_validation_summary(exc)}") from None


def _check_storable(value: Any, what: str) -> None:
    problem = codec.check_json(value)
    if problem is not None:
        raise InvalidInput(f"{what} cannot be stored as JSON: {problem}")


def _validation_summary(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(x) for x in err["loc"]) or "value"
        parts.append(f"{loc}: {err['msg']}")
    more = f" (+{exc.error_count() - 5} more)" if exc.error_count() > 5 else ""
    return ("; ".join(parts) + more)[:_MESSAGE_LIMIT]


def _spent(task: Task) -> ev.Usage:
    """The usage an executor reported into `task.spent` before it stopped (see Spend)."""
    spent = task.spent
    if not (spent.tokens_in or spent.tokens_out or spent.cost):
        return ev.NO_USAGE
    return spent.usage


def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:_MESSAGE_LIMIT]


def _decode_all(run_id: UUID, records: list[Record]) -> list[ev.Event]:
    return [codec.decode(r.data, run_id=run_id, seq=r.seq) for r in records]
