"""DBOS Transact: an async @DBOS.workflow calling five async @DBOS.step functions.

As its docs recommend: DBOS(config=...) with a SQLite system database, DBOS.launch(), the
workflow awaited directly (a durable workflow either way). Every step's output is committed
to the system database before the step returns; that is DBOS's only mode. Python's sqlite3
keeps synchronous=FULL; the file is put in WAL mode before DBOS opens it (DBOS does not do it
itself). DBOS has no in-memory store: the "memory" workloads use a file on tmpfs. A crashed
workflow is recovered by DBOS.launch() itself; the restart then waits on its handle. Checked
afterwards: workflow_status rows in SUCCESS and five operation_outputs rows per workflow.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from dbos import DBOS, SetWorkflowID

from benchmarks.common import (
    STEP_SLEEP,
    STEPS,
    W4_ID,
    Ledger,
    check,
    rows,
    time_concurrent,
    time_sequential,
    wal_file,
)

NAME = "dbos"
MODE: dict[str, Any] = {"delay": 0.0, "ledger": None, "hang": False}  # set per case


async def _work(index: int, n: int) -> int:
    if MODE["ledger"] is not None:
        await MODE["ledger"].step(index, MODE["hang"])
    elif MODE["delay"]:
        await asyncio.sleep(MODE["delay"])
    return n + 1


@DBOS.step()
async def s1(n: int) -> int:
    return await _work(1, n)


@DBOS.step()
async def s2(n: int) -> int:
    return await _work(2, n)


@DBOS.step()
async def s3(n: int) -> int:
    return await _work(3, n)


@DBOS.step()
async def s4(n: int) -> int:
    return await _work(4, n)


@DBOS.step()
async def s5(n: int) -> int:
    return await _work(5, n)


@DBOS.workflow()
async def linear(n: int) -> int:
    for step in (s1, s2, s3, s4, s5):
        n = await step(n)
    return n


def launch(db: Path) -> None:
    wal_file(db)
    DBOS(config={"name": "rulebound-bench", "system_database_url": f"sqlite:///{db}",
                 "log_level": "WARNING"})
    DBOS.launch()


def _verify(db: Path, workflows: int) -> str:
    """Count what the system database holds once DBOS is shut down."""
    done = rows(db, "SELECT count(*) FROM workflow_status WHERE status = 'SUCCESS'")[0][0]
    steps = rows(db, "SELECT count(*) FROM operation_outputs")[0][0]
    check(done == workflows, f"dbos: {done} workflows in SUCCESS, expected {workflows}")
    check(steps == workflows * STEPS, f"dbos: {steps} step outputs, expected "
                                      f"{workflows * STEPS}")
    return f"{done} workflow_status rows in SUCCESS, {steps} operation_outputs rows"


async def _measure(db: Path | None, runs: int, delay: float, timer: Any) -> dict[str, Any]:
    assert db is not None
    MODE["delay"] = delay
    launch(db)
    try:
        async def run_one(i: int) -> None:
            check(await linear(0) == STEPS, f"dbos run {i} lost a step")

        result = await timer(run_one, runs)
    finally:
        DBOS.destroy()
    result["verified"] = _verify(db, runs + 1)  # with the warm-up run
    return result


async def sequential(store: str, db: Path | None, runs: int) -> dict[str, Any]:
    return await _measure(db, runs, 0.0, time_sequential)


async def concurrent(store: str, db: Path | None, runs: int) -> dict[str, Any]:
    return await _measure(db, runs, STEP_SLEEP, time_concurrent)


async def crash_child(db: Path, ledger: Ledger) -> None:
    MODE.update(ledger=ledger, hang=True)
    ledger.mark_engine_start()
    launch(db)
    with SetWorkflowID(W4_ID):
        await linear(0)


async def crash_restart(db: Path, ledger: Ledger) -> dict[str, Any]:
    MODE.update(ledger=ledger, hang=False)
    ledger.mark_engine_start()
    launch(db)  # recovers the pending workflow by itself
    try:
        handle = await DBOS.retrieve_workflow_async(W4_ID)
        check(await asyncio.wait_for(handle.get_result(), 60) == STEPS,
              "dbos: the recovered workflow lost a step")
    finally:
        DBOS.destroy()
    return {"verified": _verify(db, 1)}
