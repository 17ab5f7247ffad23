"""Parked runs: a run with nothing to do for a while leaves memory and comes back when a
signal, a request or its own time comes; restarting loads only runs with work due."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from rulebound import END, FAIL, Engine, Retry, RetryableError, Step, Task, WaitForSignal, Workflow


async def echo(task: Task) -> Any:
    return {"ok": True}


def approval() -> Workflow:
    return Workflow("approval", on_failure=FAIL, steps=[
        WaitForSignal("ok", signal="go", timeout=3600, next="after"),
        Step("after", executor="echo", next=END)])


@pytest.fixture(params=["memory", "sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def url(request: pytest.FixtureRequest, tmp_path: Any) -> str:
    if request.param == "memory":
        return "memory://"
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'p.db'}"
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def durable(request: pytest.FixtureRequest, tmp_path: Any) -> str:
    """A store that outlives its engine."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'p.db'}"
    return str(request.getfixturevalue("postgres_url"))


async def parked(engine: Engine, count: int) -> None:
    async with asyncio.timeout(10):
        while engine.active_runs > 0 or engine.parked < count:
            await asyncio.sleep(0.02)


async def test_waiting_runs_leave_memory_and_a_signal_brings_one_back(url: str) -> None:
    async with Engine(url, [approval()], {"echo": echo}, park_after=0.2,
                      max_active_runs=3) as engine:
        runs = []
        for batch in range(4):  # 12 runs waiting, past max_active_runs: parked ones free it
            runs += [await engine.start("approval", {"i": i}) for i in range(3)]
            await parked(engine, 3 * (batch + 1))
        assert (await engine.get(runs[3])).waiting_for == ("go",)  # read from the store
        await engine.signal(runs[3], "go")
        assert (await engine.wait(runs[3], timeout=10)).status == "completed"
        waiting = asyncio.create_task(engine.wait(runs[4], timeout=10))  # brings it back
        await asyncio.sleep(0.3)
        assert not waiting.done()  # ... and keeps it while someone waits
        await engine.cancel(runs[4], "enough")
        assert (await waiting).status == "cancelled"


async def test_a_restart_loads_only_runs_with_work_due(durable: str) -> None:
    url = durable
    engine = Engine(url, [approval()], {"echo": echo}, park_after=0.2)
    async with engine:
        runs = [await engine.start("approval", {"i": i}) for i in range(6)]
        await parked(engine, 6)
    async with Engine(url, [approval()], {"echo": echo}, park_after=0.2) as again:
        assert again.active_runs == 0  # nothing loaded at open
        await again.signal(runs[0], "go")
        assert (await again.wait(runs[0], timeout=10)).status == "completed"
        assert (await again.get(runs[1])).status == "running"


async def test_a_parked_run_wakes_at_its_own_time(url: str) -> None:
    calls = 0

    async def flaky(task: Task) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RetryableError("not yet", retry_after=1.5)  # a backoff longer than park_after
        return {"ok": True}

    wf = Workflow("later", on_failure=FAIL, steps=[
        Step("s", executor="flaky", retry=Retry(attempts=3, on=("error", "server_error")),
             next=END)])
    async with Engine(url, [wf], {"flaky": flaky}, park_after=0.5) as engine:
        run_id = await engine.start("later")
        async with asyncio.timeout(10):
            while engine.parked == 0:
                await asyncio.sleep(0.02)
        assert engine.active_runs == 0
        async with asyncio.timeout(10):
            while (await engine.get(run_id)).status == "running":
                await asyncio.sleep(0.05)
        assert (await engine.get(run_id)).status == "completed" and calls == 2
