"""What every system's workload shares: the workload shape, timing, the W4 ledger, checks.

Each system module (rulebound_bench, floors, peers/*) implements the same four coroutines
so the driver can treat them alike:

    sequential(store, db, runs)  W1 (store="memory") and W2 (store="sqlite")
    concurrent(store, db, runs)  W3, in memory and on SQLite
    crash_child(db, ledger)      W4 phase 1: run until step 4 starts, then hang (gets SIGKILL)
    crash_restart(db, ledger)    W4 phase 2: resume on the same database, finish, verify
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

STEPS = 5
STEP_SLEEP = 0.010  # W3: each step awaits 10 ms, so the ideal run takes 50 ms
W4_ID = "w4-run"


class NotPersisted(RuntimeError):
    """A run that did not really persist: the case must not count."""


def check(condition: bool, what: str) -> None:
    """Fail loudly: a figure whose store does not hold what it claims is worthless."""
    if not condition:
        raise NotPersisted(what)


def wal_file(db: Path) -> None:
    """Put a fresh SQLite file in WAL mode (a persistent property of the file).

    For systems that open the file in rollback-journal mode themselves (DBOS, Burr); the
    journal mode lives in the file, so their own connections then write through the WAL.
    Python's sqlite3 leaves synchronous=FULL, the strongest setting, in place. An existing
    file (a restart) is left alone.
    """
    if db.exists():
        return
    with sqlite3.connect(db) as conn:
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    check(mode == "wal", f"{db}: journal_mode is {mode}, not wal")


def rows(db: Path, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    """Read what a system left in its SQLite file, through a connection of our own."""
    conn = sqlite3.connect(db)
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


async def time_sequential(run_one: Callable[[int], Awaitable[Any]], runs: int
                          ) -> dict[str, float]:
    """W1/W2: one warm-up run, then `runs` runs back to back; per-step time and rate."""
    await run_one(-1)
    began = time.perf_counter()
    for i in range(runs):
        await run_one(i)
    elapsed = time.perf_counter() - began
    steps = runs * STEPS
    return {"us_per_step": elapsed / steps * 1e6, "steps_per_s": steps / elapsed}


class LagProbe:
    """Samples event-loop lag: how late a 1 ms sleep wakes up while the load runs."""

    def __init__(self) -> None:
        self.lags: list[float] = []
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def _sample(self) -> None:
        while not self._stop.is_set():
            before = time.perf_counter()
            await asyncio.sleep(0.001)
            self.lags.append(time.perf_counter() - before - 0.001)

    def start(self) -> None:
        self._task = asyncio.create_task(self._sample())

    async def stop(self) -> dict[str, float]:
        self._stop.set()
        if self._task is not None:
            await self._task
        lags = sorted(self.lags) or [0.0]
        return {"loop_lag_p99_ms": lags[int(0.99 * (len(lags) - 1))] * 1e3,
                "loop_lag_max_ms": lags[-1] * 1e3}


async def time_concurrent(run_one: Callable[[int], Awaitable[Any]], runs: int
                          ) -> dict[str, float]:
    """W3: one warm-up run, then `runs` runs started at once; wall time against 50 ms."""
    await run_one(-1)
    probe = LagProbe()
    probe.start()
    began = time.perf_counter()
    await asyncio.gather(*(run_one(i) for i in range(runs)))
    elapsed = time.perf_counter() - began
    lag = await probe.stop()
    return {"wall_ms": elapsed * 1e3, "ratio_to_ideal": elapsed / (STEPS * STEP_SLEEP), **lag}


class Ledger:
    """W4's witness outside every system: steps append lines to a plain file.

    A line is `<step> start <wall time>` (also `engine <wall time>` when the engine is about
    to start, `run <id>` for systems that choose their own run ids). A SIGKILL loses no line
    already written: the data sits in the kernel's page cache, not in the dead process.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    def write(self, line: str) -> None:
        with self.path.open("a") as f:
            f.write(line + "\n")

    def mark_engine_start(self) -> None:
        self.write(f"engine {time.time()!r}")

    async def step(self, index: int, hang: bool) -> None:
        """Record that step `index` (1-based) ran; in phase 1, step 4 never finishes."""
        self.write(f"{index} start {time.time()!r}")
        if hang and index == 4:
            await asyncio.sleep(3600)

    def lines(self) -> list[list[str]]:
        if not self.path.exists():
            return []
        return [line.split() for line in self.path.read_text().splitlines() if line]

    def value(self, key: str) -> str | None:
        found = [parts[1] for parts in self.lines() if parts[0] == key]
        return found[-1] if found else None
