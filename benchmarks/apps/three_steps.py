"""An --app for the serve benchmarks: 3-step runs of 10-50 ms function steps."""

from __future__ import annotations

import asyncio
import random
from typing import Any

from rulebound import END, FAIL, Registry, Step, Workflow


async def step(input: Any) -> Any:
    await asyncio.sleep(random.uniform(0.01, 0.05))
    return {"ok": True}


registry = Registry(
    workflows=[Workflow("three", on_failure=FAIL, steps=[
        Step("a", executor="step", next="b"), Step("b", executor="step", next="c"),
        Step("c", executor="step", next=END)])],
    executors={"step": step})
