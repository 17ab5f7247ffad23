"""Giving memory back when the server is quiet (adapters/http/memory.py), through the app's
/metrics over a real loopback server, and its quiet-period rule on a clock of our own."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from rulebound.adapters.http import memory
from rulebound.adapters.http.memory import GiveBack
from rulebound.adapters.http.server import create_app
from rulebound.domain import FAIL, Step, Workflow
from rulebound.engine import Engine, Task

from tests import loopback

gate = asyncio.Event()


async def held(task: Task) -> Any:
    await gate.wait()  # in flight until the test lets it finish
    return {"done": True}


def workflows() -> list[Workflow]:
    return [Workflow("held", on_failure=FAIL, steps=[Step("work", executor="held")])]


async def _server(engine: Engine, **options: Any) -> tuple[web.AppRunner, str]:
    runner = await loopback.serve(create_app(engine, token=None, **options))
    return runner, loopback.base_url(runner)


async def _give_backs(session: aiohttp.ClientSession, base: str) -> int | None:
    async with session.get(f"{base}/metrics") as resp:
        text = await resp.text()
    found = re.search(r"^rulebound_memory_give_backs_total (\d+)$", text, re.M)
    return int(found.group(1)) if found else None


async def _until(session: aiohttp.ClientSession, base: str, count: int) -> None:
    for _ in range(200):
        if await _give_backs(session, base) == count:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"give-backs never reached {count}: {await _give_backs(session, base)}")


async def test_gives_back_once_per_quiet_period_and_never_while_a_run_is_going(
        sqlite_url: str) -> None:
    gate.clear()
    async with Engine(sqlite_url, workflows(), {"held": held}) as engine:
        runner, base = await _server(engine, give_back_after=0.3)
        try:
            async with aiohttp.ClientSession() as session:
                await _until(session, base, 1)  # quiet since start-up
                async with session.post(f"{base}/v1/runs", json={"workflow": "held"}) as resp:
                    assert resp.status == 201
                    run_id = (await resp.json())["run_id"]
                ends = time.monotonic() + 1.5  # five quiet periods long, with a run going
                while time.monotonic() < ends:
                    assert engine.active_runs == 1
                    assert await _give_backs(session, base) == 1
                    await asyncio.sleep(0.1)
                gate.set()
                await engine.wait(run_id, timeout=5)
                await _until(session, base, 2)  # quiet again after the run
                await asyncio.sleep(1.0)  # quiet for longer: still once, /metrics is no work
                assert await _give_backs(session, base) == 2
        finally:
            gate.set()
            await runner.cleanup()


async def test_off_unless_asked(sqlite_url: str) -> None:
    """create_app is for a host's own process too: it gives nothing back by default."""
    async with Engine(sqlite_url, workflows(), {"held": held}) as engine:
        runner, base = await _server(engine)
        try:
            async with aiohttp.ClientSession() as session:
                assert await _give_backs(session, base) is None
        finally:
            await runner.cleanup()


class Quiet:
    """What GiveBack reads of an engine, set by the test."""

    def __init__(self) -> None:
        self.active_runs = self.attempts_in_flight = 0
        self.metrics = type("M", (), {"commits": 0})()
        self.ended_states_kept = 0


def test_quiet_periods_on_a_clock_of_our_own() -> None:
    now = [0.0]
    engine = Quiet()
    trims = [0]  # malloc_trim(0) calls, on a platform that has it

    def trim() -> int:
        trims[0] += 1
        return 1

    give = GiveBack(engine, 10.0, clock=lambda: now[0],  # type: ignore[arg-type]
                    find_trim=lambda: trim)

    def at(t: float) -> bool:
        now[0] = t
        return give.due()

    assert not at(0.0) and not at(9.9) and at(10.0)  # quiet since start-up
    asyncio.run(give.once())
    assert not at(11.0) and not at(100.0)  # once per quiet period
    engine.metrics.commits += 1  # something was written (a signal, a timer)
    assert not at(101.0) and not at(110.9) and at(111.0)
    asyncio.run(give.once())
    engine.active_runs = 1  # a run going for longer than the period: never due
    assert not any(at(t) for t in (200.0, 300.0, 400.0))
    engine.active_runs = 0
    give.requests += 1  # a client read a run
    assert not at(401.0) and at(411.0)
    asyncio.run(give.once())
    engine.ended_states_kept = 1  # a run ended and its state is kept ...
    assert not at(412.0) and not at(421.0) and at(422.0)
    asyncio.run(give.once())
    engine.ended_states_kept = 0  # ... and let go later: that memory is free now
    assert not at(430.0) and not at(439.9) and at(440.0)
    asyncio.run(give.once())
    assert give.passes == trims[0] == 5


def test_where_there_is_no_malloc_trim_only_the_collection_is_done(
        caplog: pytest.LogCaptureFixture) -> None:
    """musl, macOS: the C library has no malloc_trim; a give-back still counts, and says so."""
    caplog.set_level(logging.DEBUG, logger="rulebound.http")
    give = GiveBack(Quiet(), 10.0, find_trim=lambda: None)  # type: ignore[arg-type]
    asyncio.run(give.once())
    assert give.passes == 1
    assert "malloc_trim not available" in caplog.text
    assert memory.give_back(find_trim=lambda: None) is False
    # This platform's own: True where the C library has malloc_trim (glibc).
    assert memory.give_back() is (memory.malloc_trim() is not None)


def test_rejects_a_period_that_is_not_positive() -> None:
    for after in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="after must be positive"):
            GiveBack(Quiet(), after)  # type: ignore[arg-type]
