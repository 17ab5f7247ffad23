"""The floor under engine_bench's targets: the per-step work the design requires, done with
no engine at all, so the engine's figures can be read against what is possible here.

A floor run walks the 5-step linear workflow of engine_bench by hand. Per step it does only
what the issue and DESIGN.md fix, each part at its cheapest:

- build the step's five events (AttemptSucceeded, StepCompleted, TransitionTaken, and the
  next StepScheduled and AttemptStarted; the last step's four end in RunCompleted), without
  re-validation as the engine's hot path does (RunStarted and RunCompleted are validated,
  as in the engine);
- fold them into the run's state (the live state is the fold of the log);
- stamp them: orjson body and the sha256 hash chain;
- append them in one write through the store (the library's recorders; on SQLite through
  the writer thread, so that AttemptStarted is durable before the executor is called);
- run the executor under a timeout scope (timeouts are enforced by cancellation), inline in
  the run's own coroutine: the engine gives each attempt a task of its own, which a linear
  run could do without.

What it leaves out is everything that decides: no decider, no definition lookups, no
limits, rate limits, timers, locks, waiters, metrics or read model. Every figure here is
therefore a lower bound for any engine built to this design, in this interpreter, on this
machine. `primitives` also times each part alone, and the raw cost of one fsync'd SQLite
commit and of one loop -> thread -> loop round trip.
"""

from __future__ import annotations

import asyncio
import queue
import sqlite3
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import uuid4

from rulebound.domain import events as ev
from rulebound.domain.state import RunState, evolve
from rulebound.engine import codec
from rulebound.engine.storage import StoreWorker
from rulebound.engine.store import Record
from rulebound.engine.stores import open_store

from benchmarks.common import LagProbe

STEPS = 5
_tuple_new = tuple.__new__


class FloorRun:
    """One run of the linear workflow, advanced by hand (no decider)."""

    def __init__(self, worker: StoreWorker) -> None:
        self.worker = worker
        self.run_id = uuid4()
        self.state = RunState()
        self.prev = codec.GENESIS_HASH
        self.ids = 0
        self.prefix = str(uuid4())[:24]

    async def commit(self, batch: list[ev.Event]) -> None:
        state = self.state
        for event in batch:
            state = evolve(state, event)
        records = []
        seq = self.state.version
        prev = self.prev
        for event in batch:
            seq += 1
            self.ids += 1
            prev, data = codec.stamp(event, f"{self.prefix}{self.ids:012x}", prev)
            records.append(_tuple_new(Record, (self.run_id, seq, event.type, data)))
        await self.worker.append(records)
        self.state, self.prev = state, prev

    async def run(self, executor: Any) -> None:
        now = datetime.now(UTC)
        await self.commit([
            ev.RunStarted(at=now, workflow="floor", definition_hash="0" * 64, input=None,
                          limits={"deadline": 3600.0}, seed=1),
            *_start_step("s0", now)])
        for i in range(STEPS):
            async with asyncio.timeout(60.0):  # inline: no task of its own (cheaper still)
                output = await executor(None)
            nxt = f"s{i + 1}" if i + 1 < STEPS else None
            await self.commit(_step_events(datetime.now(UTC), f"s{i}", nxt, output))
        assert self.state.status == "completed", self.state.status


def _start_step(name: str, now: datetime) -> list[ev.Event]:
    return [
        ev.trusted(ev.StepScheduled, at=now, step=name, kind="task", visit=1, attempt=1,
                   not_before=now, reason="floor", max_cost=0.0),
        ev.trusted(ev.AttemptStarted, at=now, step=name, attempt=1, executor="work",
                   worker="floor", deadline=now + timedelta(seconds=60)),
    ]


def _step_events(now: datetime, name: str, nxt: str | None, output: Any) -> list[ev.Event]:
    """What a step's result leads to: its end, the transition, and the next step's start
    (or, after the last step, the run's end)."""
    done: list[ev.Event] = [
        ev.trusted(ev.AttemptSucceeded, at=now, step=name, attempt=1, output=output),
        ev.trusted(ev.StepCompleted, at=now, step=name, visit=1, output=output),
        ev.trusted(ev.TransitionTaken, at=now, from_step=name, to_step=nxt or "end",
                   condition="next")]
    if nxt is None:
        return [*done, ev.RunCompleted(at=now, output=output, reason="floor")]
    return [*done, *_start_step(nxt, now)]


async def _noop(task: Any) -> Any:
    return None


async def _sleep10(task: Any) -> Any:
    await asyncio.sleep(0.010)
    return None


def _worker(url: str) -> StoreWorker:
    worker = StoreWorker(open_store(url))
    worker.start()
    return worker


async def sequential(url: str, runs: int, run: Any = None) -> dict[str, float]:
    """`runs` runs one after another; `run` builds a run from the worker (FloorRun, or
    another design's floor, as redesign_floor.py measures)."""
    make = run or FloorRun
    worker = _worker(url)
    try:
        await make(worker).run(_noop)  # warm-up
        began = time.perf_counter()
        for _ in range(runs):
            await make(worker).run(_noop)
        elapsed = time.perf_counter() - began
    finally:
        await worker.close()
    return {"us_per_step": elapsed / (runs * STEPS) * 1e6}


async def concurrent(url: str, runs: int) -> dict[str, float]:
    worker = _worker(url)
    try:
        await FloorRun(worker).run(_sleep10)
        probe = LagProbe()
        probe.start()
        began = time.perf_counter()
        await asyncio.gather(*(FloorRun(worker).run(_sleep10) for _ in range(runs)))
        elapsed = time.perf_counter() - began
        lag = await probe.stop()
    finally:
        await worker.close()
    return {"wall_ms": elapsed * 1e3, "ratio_to_ideal": elapsed / 0.050, **lag}


# --- each part alone -------------------------------------------------------------------


async def primitives(db: Path, n: int = 5000) -> dict[str, float]:
    """Each required part of a step, timed alone (microseconds per step)."""
    from rulebound.adapters.stores.memory import MemoryStore

    now = datetime.now(UTC)
    out: dict[str, float] = {}

    began = time.perf_counter()
    for _ in range(n):
        _step_events(now, "s0", "s1", None)
    out["build_5_events_us"] = (time.perf_counter() - began) / n * 1e6

    start = RunState()
    for event in [ev.RunStarted(at=now, workflow="f", definition_hash="0" * 64,
                                limits={"deadline": 3600.0}, seed=1),
                  *_start_step("s0", now)]:
        start = evolve(start, event)
    batch = _step_events(now, "s0", "s1", None)
    began = time.perf_counter()
    for _ in range(n):
        state = start
        for event in batch:
            state = evolve(state, event)
    out["fold_5_events_us"] = (time.perf_counter() - began) / n * 1e6

    prev = codec.GENESIS_HASH
    began = time.perf_counter()
    for i in range(n):
        for event in batch:
            prev, _data = codec.stamp(event, f"{i:036x}", prev)
    out["stamp_5_events_us"] = (time.perf_counter() - began) / n * 1e6

    store = MemoryStore()
    run_id = uuid4()
    began = time.perf_counter()
    for i in range(n):
        store.append([_tuple_new(Record, (run_id, i * 5 + j + 1, "T", b"{}"))
                      for j in range(5)])
    out["append_5_events_memory_us"] = (time.perf_counter() - began) / n * 1e6

    began = time.perf_counter()
    for _ in range(n):
        async with asyncio.timeout(60.0):
            await _noop(None)
    out["timeout_scope_us"] = (time.perf_counter() - began) / n * 1e6

    out["thread_round_trip_us"] = await _round_trip(min(n, 2000))
    out["sqlite_fsync_commit_us"] = _sqlite_commit(db, min(n, 1000))
    return out


async def _round_trip(n: int) -> float:
    """Loop -> writer thread -> loop, doing nothing: what handing a write to a thread costs."""
    loop = asyncio.get_running_loop()
    inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()

    def serve() -> None:
        while (future := inbox.get()) is not None:
            loop.call_soon_threadsafe(future.set_result, None)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    began = time.perf_counter()
    for _ in range(n):
        future = loop.create_future()
        inbox.put(future)
        await future
    elapsed = time.perf_counter() - began
    inbox.put(None)
    thread.join()
    return elapsed / n * 1e6


def _sqlite_commit(db: Path, n: int) -> float:
    """One transaction of five ~400-byte rows, WAL, synchronous=FULL: the fsync a step pays."""
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("CREATE TABLE e (run TEXT, seq INTEGER, topic TEXT, data BLOB, "
                     "PRIMARY KEY (run, seq))")
        statement = "INSERT INTO e VALUES " + ",".join(["(?,?,?,?)"] * 5)
        run, data = uuid4().hex, b"x" * 400
        began = time.perf_counter()
        for i in range(n):
            conn.execute("BEGIN")
            conn.execute(statement, [v for j in range(5) for v in (run, i * 5 + j, "T", data)])
            conn.execute("COMMIT")
        return (time.perf_counter() - began) / n * 1e6
    finally:
        conn.close()
