"""An --app for the readiness tests: its executor's `open` (which the engine awaits while it
opens, before recovering runs) waits until the file named by GATE_FILE exists, so a test
decides how long `rulebound serve` stays not ready."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from rulebound import FAIL, ExecutorContext, Registry, Step, Task, Workflow


class Gated:
    async def open(self, context: ExecutorContext) -> None:
        gate = Path(os.environ["GATE_FILE"])
        while not await asyncio.to_thread(gate.exists):
            await asyncio.sleep(0.02)

    async def __call__(self, task: Task) -> Any:
        return {"done": task.input}


registry = Registry(
    workflows=[Workflow("gated", on_failure=FAIL, steps=[Step("work", executor="gated")])],
    executors={"gated": Gated()})
