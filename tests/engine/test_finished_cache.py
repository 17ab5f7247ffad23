"""Ended runs' final states are kept in memory for a while (get and wait answer without a
read), bounded by age as well as count: after a burst, the memory goes once the states age
out, and every ended run still answers from the store."""

from __future__ import annotations

import asyncio
import gc
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from rulebound import END, FAIL, Engine, InvalidInput, RunTerminal, Step, Task, Workflow


async def echo(task: Task) -> Any:
    return {"echo": task.input, "padding": "x" * 2000}


def chain() -> Workflow:
    return Workflow("chain", on_failure=FAIL, steps=[
        Step("a", executor="echo", next="b"), Step("b", executor="echo", next=END)])


async def test_ended_runs_age_out_of_memory_and_still_answer_from_the_store(
        tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'f.db'}"
    async with Engine(url, [chain()], {"echo": echo}, keep_finished_for=0.5) as engine:
        await engine.wait(await engine.start("chain", {"i": -1}), timeout=10)  # warm-up
        gc.collect()
        tracemalloc.start()
        try:
            runs = [await engine.start("chain", {"i": i}) for i in range(200)]
            for run_id in runs:
                assert (await engine.wait(run_id, timeout=10)).status == "completed"
            gc.collect()
            kept = tracemalloc.get_traced_memory()[0]
            await asyncio.sleep(1.5)  # past keep_finished_for, and a sweep or two
            gc.collect()
            let_go = kept - tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()
        print(f"let go after the states aged out: {let_go / 200:.0f} B per run")
        assert let_go > 200 * 2000  # at least each run's final output
        for run_id in runs[:20]:  # read from the store now, the same answers
            view = await engine.get(run_id)
            assert view.status == "completed" and view.output["echo"] == {
                "i": runs.index(run_id)}
            assert (await engine.wait(run_id, timeout=1)).status == "completed"
            with pytest.raises(RunTerminal):
                await engine.signal(run_id, "go")


async def test_a_bad_age_is_refused() -> None:
    for bad in (0, -1.0, float("nan")):
        with pytest.raises(InvalidInput, match="keep_finished_for"):
            Engine("memory://", keep_finished_for=bad)


async def test_an_idempotent_start_of_an_ended_run_answers_with_no_state_kept(
        tmp_path: Path) -> None:
    # keep_finished=0: the ended run's state is read from the store, not from memory.
    url = f"sqlite:///{tmp_path / 'k.db'}"
    async with Engine(url, [chain()], {"echo": echo}, keep_finished=0) as engine:
        first = await engine.start("chain", {"i": 1}, idempotency_key="k")
        assert (await engine.wait(first, timeout=10)).status == "completed"
        again, created = await engine.start_run("chain", {"i": 1}, idempotency_key="k")
        assert (again, created) == (first, False)
