"""rulebound's side of the comparison, through the public facade only.

    async with Engine(store=..., workflows=[...], executors={...}) as engine:
        run_id = await engine.start(...); await engine.wait(run_id)

On SQLite every step's result and the next attempt's start are committed (WAL,
synchronous=FULL) before the next executor call: that is the engine's contract, not a setting.
The store is read back afterwards through a fresh engine: every run must have completed with
five successful attempts in its own event log.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import engine_bench  # noqa: E402  (reused: workflow and replay case)
from benchmarks.common import (  # noqa: E402
    STEP_SLEEP,
    STEPS,
    Ledger,
    check,
    time_concurrent,
    time_sequential,
)

NAME = "rulebound"


def _url(store: str, db: Path | None) -> str:
    return "memory://" if store == "memory" else f"sqlite:///{db}"


async def _noop(task: Any) -> Any:
    return None


async def _sleep(task: Any) -> Any:
    await asyncio.sleep(STEP_SLEEP)
    return None


async def _verify(engine: Any, run_ids: list[Any]) -> None:
    """Each run completed, and its own log holds five successful attempts."""
    for run_id in run_ids:
        view = await engine.get(run_id)
        check(view.status == "completed", f"rulebound run {run_id} is {view.status}")
        names = [type(e).__name__ for e in await engine.events(run_id)]
        check(names.count("AttemptSucceeded") == STEPS and names[-1] == "RunCompleted",
              f"rulebound run {run_id}: log holds {names.count('AttemptSucceeded')} "
              f"successful attempts, last event {names[-1] if names else None}")


async def _measure(store: str, db: Path | None, runs: int, executor: Any,
                   timer: Any) -> dict[str, Any]:
    from rulebound.engine import Engine

    url = _url(store, db)
    run_ids: list[Any] = []
    async with Engine(store=url, workflows=[engine_bench.linear(STEPS)],
                      executors={"work": executor}, max_concurrency=2000) as engine:

        async def run_one(i: int) -> None:
            run_id = await engine.start("bench-linear")
            await engine.wait(run_id)
            if i >= 0:
                run_ids.append(run_id)

        result = await timer(run_one, runs)
        storage = getattr(engine, "storage", None)
        result["commits"] = getattr(storage, "commits", 0)
        result["writes_sharing_a_commit"] = getattr(storage, "batched_writes", 0)
        if store == "memory":
            await _verify(engine, run_ids)
    if store == "sqlite":  # read back through a fresh engine: only what was committed
        async with Engine(store=url, workflows=[engine_bench.linear(STEPS)],
                          executors={"work": executor}) as engine:
            await _verify(engine, run_ids)
    check(len(run_ids) == runs, f"rulebound: {len(run_ids)} of {runs} runs finished")
    result["verified"] = f"{runs} runs completed, {runs * STEPS} successful attempts in the log"
    return result


async def sequential(store: str, db: Path | None, runs: int) -> dict[str, Any]:
    return await _measure(store, db, runs, _noop, time_sequential)


async def concurrent(store: str, db: Path | None, runs: int) -> dict[str, Any]:
    return await _measure(store, db, runs, _sleep, time_concurrent)


def _ledger_executor(ledger: Ledger, hang: bool) -> Any:
    async def work(task: Any) -> Any:
        await ledger.step(int(task.step[1:]) + 1, hang)  # steps are named s0..s4
        return None
    return work


def _recovery_workflow() -> Any:
    """W4's chain. An abandoned attempt (the engine died while it ran) is retried by the
    step's retry policy, whose default waits 1 s first, since the attempt may itself have
    killed the process. The peers re-run an interrupted step at once; for a like-for-like
    recovery time, W4 declares that choice explicitly: no backoff."""
    from rulebound.domain import END, FAIL, Retry, Step, Workflow

    return Workflow("bench-linear", on_failure=FAIL, steps=[
        Step(f"s{i}", executor="work", retry=Retry(backoff=0),
             next=f"s{i + 1}" if i + 1 < STEPS else END)
        for i in range(STEPS)])


async def crash_child(db: Path, ledger: Ledger) -> None:
    from rulebound.engine import Engine

    ledger.mark_engine_start()
    async with Engine(store=_url("sqlite", db), workflows=[_recovery_workflow()],
                      executors={"work": _ledger_executor(ledger, hang=True)}) as engine:
        run_id = await engine.start("bench-linear")
        ledger.write(f"run {run_id}")
        await engine.wait(run_id)


async def crash_restart(db: Path, ledger: Ledger) -> dict[str, Any]:
    from rulebound.engine import Engine

    run_id = ledger.value("run")
    check(run_id is not None, "rulebound: the killed process never recorded its run id")
    ledger.mark_engine_start()
    async with Engine(store=_url("sqlite", db), workflows=[_recovery_workflow()],
                      executors={"work": _ledger_executor(ledger, hang=False)}) as engine:
        await engine.wait(run_id, timeout=60)
        await _verify(engine, [run_id])
    return {"verified": "resumed run completed, 5 successful attempts in the log"}


async def replay() -> dict[str, Any]:
    """rulebound only: decode and fold a 10,240-event run (engine_bench's case)."""
    return await engine_bench.case_replay(10_240)
