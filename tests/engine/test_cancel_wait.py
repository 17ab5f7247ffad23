"""A cancelled wait ends cancelled, also when the run ends in the same loop iteration."""

from __future__ import annotations

import asyncio
from typing import Any

from rulebound import END, FAIL, Engine, Step, Task, Workflow


async def test_a_wait_cancelled_as_its_run_ends_is_cancelled() -> None:
    # On Python 3.11 asyncio.wait_for returns the result when its caller is cancelled in the
    # iteration its awaitable completes: the cancellation is lost and the caller (a request
    # being cut off at close, a client that went away) carries on as if never cancelled.
    # Cancel at every iteration around the run's end: each cancel that is accepted must end
    # the wait cancelled.
    gate = asyncio.Event()

    async def work(task: Task) -> Any:
        await gate.wait()
        return {}

    wf = Workflow("one", on_failure=FAIL, steps=[Step("s", executor="work", next=END)])
    lost = []
    async with Engine("memory://", [wf], {"work": work}) as engine:
        for spins in range(40):
            gate.clear()
            run_id = await engine.start("one")
            waiting = asyncio.create_task(engine.wait(run_id, timeout=10))
            for _ in range(3):
                await asyncio.sleep(0)
            gate.set()
            for _ in range(spins):
                await asyncio.sleep(0)
            if waiting.cancel():
                try:
                    await waiting
                except asyncio.CancelledError:
                    continue
                lost.append(spins)
            else:
                await waiting
    assert not lost, f"cancellations lost after {lost} iterations"
