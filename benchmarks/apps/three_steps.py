"""An --app for the serve benchmarks: 3-step runs of 10-50 ms function steps.

Each step sleeps a time drawn from a hash of its run's id and its name: uniform over
10-50 ms across runs, the same for a given run and step (a retried or recovered step waits
as long as it did the first time).
"""

from __future__ import annotations

import asyncio
import zlib
from typing import Any

from rulebound import END, FAIL, Registry, Step, Task, Workflow


async def step(input: Any, task: Task) -> Any:
    draw = zlib.crc32(f"{task.run_id}:{task.step}".encode()) % 4001  # 0..4000
    await asyncio.sleep(0.010 + draw / 100_000)
    return {"ok": True}


registry = Registry(
    workflows=[Workflow("three", on_failure=FAIL, steps=[
        Step("a", executor="step", next="b"), Step("b", executor="step", next="c"),
        Step("c", executor="step", next=END)])],
    executors={"step": step})
