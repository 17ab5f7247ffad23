"""The machine's floor: what the workloads cost with no workflow system at all.

W1/W3: bare asyncio (one task per run awaiting five coroutines). W2: raw sqlite3 on a WAL
file with synchronous=FULL, one row per step, committed one step per transaction or 200 steps
per transaction (what a perfect group commit could reach). No W4: there is nothing to resume.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path
from typing import Any

from benchmarks.common import STEP_SLEEP, STEPS, check, rows, time_concurrent, time_sequential

NAME = "floor"
BATCH = 200


async def _step(n: int, delay: float) -> int:
    if delay:
        await asyncio.sleep(delay)
    return n + 1


async def _run(delay: float) -> int:
    n = 0
    for _ in range(STEPS):
        n = await _step(n, delay)
    return n


async def sequential(store: str, db: Path | None, runs: int) -> dict[str, Any]:
    if store == "memory":
        async def run_one(i: int) -> None:
            check(await asyncio.create_task(_run(0.0)) == STEPS, "floor: lost a step")
        result = await time_sequential(run_one, runs)
        result["verified"] = "every run returned 5"
        return result
    return _sqlite_commits(db, runs)


def _sqlite_commits(db: Path | None, runs: int) -> dict[str, Any]:
    """One fsync'd commit per step, then the same rows committed BATCH at a time."""
    assert db is not None
    conn = sqlite3.connect(db, isolation_level=None)
    check(conn.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal", "floor: no WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("CREATE TABLE steps (run INTEGER, step INTEGER, kind TEXT, payload BLOB)")
    payload = b"x" * 200
    steps = runs * STEPS
    began = time.perf_counter()
    for i in range(steps):
        conn.execute("BEGIN")
        conn.execute("INSERT INTO steps VALUES (?, ?, 'single', ?)",
                     (i // STEPS, i % STEPS, payload))
        conn.execute("COMMIT")
    single = time.perf_counter() - began
    began = time.perf_counter()
    for start in range(0, steps, BATCH):
        conn.execute("BEGIN")
        conn.executemany("INSERT INTO steps VALUES (?, ?, 'batched', ?)",
                         [(i // STEPS, i % STEPS, payload)
                          for i in range(start, min(start + BATCH, steps))])
        conn.execute("COMMIT")
    batched = time.perf_counter() - began
    conn.close()
    counts = dict(rows(db, "SELECT kind, count(*) FROM steps GROUP BY kind"))
    check(counts == {"single": steps, "batched": steps}, f"floor: table holds {counts}")
    return {"us_per_step": single / steps * 1e6, "steps_per_s": steps / single,
            "batched_us_per_step": batched / steps * 1e6,
            "batched_steps_per_s": steps / batched,
            "verified": f"{steps} rows committed singly, {steps} in batches of {BATCH}"}


async def concurrent(store: str, db: Path | None, runs: int) -> dict[str, Any]:
    async def run_one(i: int) -> None:
        check(await _run(STEP_SLEEP) == STEPS, "floor: lost a step")
    result = await time_concurrent(run_one, runs)
    result["verified"] = "every run returned 5"
    return result
