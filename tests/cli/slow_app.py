"""An --app for the serve tests: one workflow whose only step takes SLOW_SECONDS (1.5 s)."""

from __future__ import annotations

import asyncio
import os
from typing import Any

from rulebound import FAIL, Registry, Step, Task, Workflow


async def slow(task: Task) -> Any:
    await asyncio.sleep(float(os.environ.get("SLOW_SECONDS", "1.5")))
    return {"done": task.input}


registry = Registry(
    workflows=[Workflow("slow", on_failure=FAIL, steps=[Step("work", executor="slow")])],
    executors={"slow": slow})
