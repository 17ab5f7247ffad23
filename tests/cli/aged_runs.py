"""Runs of tests/cli/archive_app.py that ended weeks ago, for the retention tests: the engine
that ran them had its clock (the injected one, stamped on every event) 40 days behind."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

from rulebound import Engine
from tests.cli.archive_app import registry

OLD = timedelta(days=40)


class Shifted:
    """The system clock moved by `offset`: runs that ended weeks ago, in a second."""

    def __init__(self, offset: timedelta) -> None:
        self.offset = offset

    def now(self) -> datetime:
        return datetime.now(UTC) + self.offset

    def monotonic(self) -> float:
        return time.monotonic()


async def fill(url: str) -> tuple[set[str], str, set[str]]:
    """Ended runs 40 days old, runs that ended just now, and a run still going."""
    async with Engine(url, registry=registry, clock=Shifted(-OLD)) as engine:
        old = [await engine.start("pay", {"n": i}) for i in range(6)]
        old += [await engine.start("broken", {"n": i}) for i in range(3)]
        for run in old:
            await engine.wait(run, timeout=30)
    async with Engine(url, registry=registry) as engine:
        recent = [await engine.start("pay", {"n": i}) for i in range(3)]
        for run in recent:
            await engine.wait(run, timeout=30)
        going = await engine.start("hold", {})  # waits a day for its signal
    return {str(r) for r in old}, str(going), {str(r) for r in recent}


