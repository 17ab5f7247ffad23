"""A burst of results is committed over several loop iterations, so the loop stays responsive.

The turn clock (`engine.engine._perf_counter`) is driven by the test: every reading advances
1 ms, so three commits fit in a 2 ms turn whatever the machine's speed. Nothing here is timed.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import pytest

import engine.engine as engine_module
from domain import END, FAIL, Step, Workflow
from engine import Engine, Task

RUNS = 20


@pytest.fixture
def ms_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    ticks = itertools.count()
    monkeypatch.setattr(engine_module, "_perf_counter", lambda: next(ticks) * 0.001)


async def test_a_burst_of_results_is_committed_over_several_iterations(
    store_url: str, ms_clock: None
) -> None:
    release = asyncio.Event()
    all_started = asyncio.Event()
    started = 0

    async def gated(task: Task) -> Any:
        nonlocal started
        started += 1
        if started == RUNS:
            all_started.set()
        await release.wait()
        return {"n": 1}

    wf = Workflow("burst", on_failure=FAIL, steps=[Step("only", executor="gated", next=END)])
    async with Engine(store_url, [wf], {"gated": gated}) as engine:
        runs = [await engine.start("burst") for _ in range(RUNS)]
        await asyncio.wait_for(all_started.wait(), 10)
        appends = 0  # writes handed to the store: one per commit, right after its turn
        storage_append = engine.storage.append

        async def counting_append(records: Any) -> None:
            nonlocal appends
            appends += 1
            await storage_append(records)

        engine.storage.append = counting_append  # type: ignore[method-assign]
        per_iteration: list[int] = []
        done = asyncio.Event()
        loop = asyncio.get_running_loop()

        def probe(last: int) -> None:  # runs once per loop iteration
            per_iteration.append(appends - last)
            if appends < RUNS:
                loop.call_soon(probe, appends)
            else:
                done.set()

        release.set()  # every executor returns in the same iteration
        loop.call_soon(probe, 0)
        await asyncio.wait_for(done.wait(), 10)
        views = [await engine.wait(r, timeout=10) for r in runs]

    assert all(v.status == "completed" for v in views)
    assert sum(per_iteration) == RUNS
    # Without turns all 20 commits land in one iteration; with them, at most a turn's worth
    # (3 here: 0, 1 and 2 ms into the turn) is written between two runs of the probe.
    assert max(per_iteration) <= 3, per_iteration
    assert len([n for n in per_iteration if n]) >= RUNS // 3


async def test_a_cancelled_waiter_does_not_hold_up_the_queue(ms_clock: None) -> None:
    async with Engine("memory://", [], {}) as engine:
        assert engine._turn() is None  # opens a turn at 0 ms
        assert engine._turn() is None  # 1 ms
        assert engine._turn() is None  # 2 ms: still within the turn
        waiters = [engine._turn() for _ in range(4)]  # over the turn: they queue in order
        assert all(w is not None for w in waiters)
        assert engine._fit == 3
        waiters[0].cancel()  # type: ignore[union-attr]
        engine._end_turn()
        assert [w.done() and not w.cancelled() for w in waiters] == [False, True, True, True]
        assert not engine._deferred
