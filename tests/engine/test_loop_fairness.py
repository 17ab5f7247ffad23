"""A burst of results is committed over several loop iterations, so the loop stays responsive.

The turn clock is driven by the test (`Turns(clock=...)`): every reading advances 1 ms, so
three commits fit in a 2 ms turn whatever the machine's speed. Nothing here is timed.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import pytest
from pydantic import BaseModel, field_validator
from rulebound.domain import END, FAIL, Step, Workflow
from rulebound.engine import Engine, Task
from rulebound.engine.turns import Turns

RUNS = 20


@pytest.fixture
def ms_turns() -> Turns:
    """Turns whose clock advances 1 ms at every reading."""
    ticks = itertools.count()
    return Turns(clock=lambda: next(ticks) * 0.001)


class Gate:
    """An executor whose attempts all wait for one release, so their results land at once."""

    def __init__(self, runs: int = RUNS, output: type[BaseModel] | None = None) -> None:
        self.runs = runs
        self.release = asyncio.Event()
        self.all_started = asyncio.Event()
        self.started = 0
        self.workflow = Workflow("burst", on_failure=FAIL, steps=[
            Step("only", executor="gated", output=output, next=END)])

    async def __call__(self, task: Task) -> Any:
        self.started += 1
        if self.started == self.runs:
            self.all_started.set()
        await self.release.wait()
        return {"n": 1}

    async def start_all(self, engine: Engine) -> list[Any]:
        runs = [await engine.start("burst") for _ in range(self.runs)]
        await asyncio.wait_for(self.all_started.wait(), 10)
        return runs


async def test_a_burst_of_results_is_committed_over_several_iterations(
    ms_turns: Turns
) -> None:
    # In memory a commit completes in the iteration its turn lets it through, so the count
    # of commits between two runs of the probe is what one turn let through.
    gate = Gate()
    release = gate.release
    engine = Engine("memory://", [gate.workflow], {"gated": gate})
    engine.turns = ms_turns
    async with engine:
        runs = await gate.start_all(engine)
        before = engine.metrics.commits
        per_iteration: list[int] = []
        done = asyncio.Event()
        loop = asyncio.get_running_loop()

        def probe(last: int) -> None:  # runs once per loop iteration
            commits = engine.metrics.commits - before
            per_iteration.append(commits - last)
            if commits < RUNS:
                loop.call_soon(probe, commits)
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


def counting_model(checked: list[int]) -> type[BaseModel]:
    """An output model that records each check of an output: the engine checks a result's
    output after the executor returns and before it commits, so this counts results as the
    engine processes them."""

    class Counted(BaseModel):
        n: int

        @field_validator("n")
        @classmethod
        def count(cls, value: int) -> int:
            checked.append(value)
            return value

    return Counted


async def test_results_that_end_together_are_processed_over_several_iterations(
    ms_turns: Turns
) -> None:
    # Not only the commit: everything the engine does with a result (here, checking its
    # output) waits for a turn, so 20 executors that return in the same iteration do not
    # make that iteration do all of their work.
    checked: list[int] = []
    gate = Gate(output=counting_model(checked))
    engine = Engine("memory://", [gate.workflow], {"gated": gate})
    engine.turns = ms_turns
    async with engine:
        runs = await gate.start_all(engine)
        per_iteration: list[int] = []
        done = asyncio.Event()
        loop = asyncio.get_running_loop()

        def probe(last: int) -> None:  # runs once per loop iteration
            per_iteration.append(len(checked) - last)
            if len(checked) < RUNS:
                loop.call_soon(probe, len(checked))
            else:
                done.set()

        gate.release.set()  # every executor returns in the next iteration
        loop.call_soon(probe, 0)
        await asyncio.wait_for(done.wait(), 10)
        views = [await engine.wait(r, timeout=10) for r in runs]

    assert all(v.status == "completed" for v in views)
    assert sum(per_iteration) == RUNS
    # Without a turn for results all 20 outputs are checked in one iteration.
    assert max(per_iteration) <= 3, per_iteration
    assert len([n for n in per_iteration if n]) >= RUNS // 3


async def test_a_heartbeat_runs_while_a_burst_of_results_is_processed(store_url: str) -> None:
    # The engine's own turns (2 ms of work, then the loop's other callbacks): a heartbeat
    # task on the same loop gets to run between the first result processed and the last.
    # Counted, not timed: 400 results cannot all be processed within one 2 ms turn, and a
    # slower machine only spreads them over more turns.
    runs = 400
    beats = 0
    at_check: list[int] = []  # the heartbeat's count at each output checked

    class Recorded(list[int]):
        def append(self, value: int) -> None:
            at_check.append(beats)
            super().append(value)

    checks = Recorded()
    gate = Gate(runs, output=counting_model(checks))
    async with Engine(store_url, [gate.workflow], {"gated": gate},
                      max_concurrency=runs) as engine:
        ids = await gate.start_all(engine)
        stop = asyncio.Event()

        async def heartbeat() -> None:
            nonlocal beats
            while not stop.is_set():
                beats += 1
                await asyncio.sleep(0)

        beating = asyncio.create_task(heartbeat())
        gate.release.set()
        views = await asyncio.wait_for(
            asyncio.gather(*(engine.wait(r, timeout=30) for r in ids)), 60)
        stop.set()
        await beating
    assert all(v.status == "completed" for v in views)
    assert len(at_check) == runs
    # Without turns for results, all 400 are checked in one iteration: no beat in between.
    assert at_check[-1] > at_check[0], (at_check[0], at_check[-1])


async def test_a_cancelled_waiter_does_not_hold_up_the_queue(ms_turns: Turns) -> None:
    turns = ms_turns
    assert turns.gate() is None  # opens a turn at 0 ms
    assert turns.gate() is None  # 1 ms
    assert turns.gate() is None  # 2 ms: still within the turn
    waiters = [turns.gate() for _ in range(4)]  # over the turn: they queue in order
    assert all(w is not None for w in waiters)
    assert turns.queued == 4
    waiters[0].cancel()  # type: ignore[union-attr]
    turns.end()
    assert turns.fit == 3  # 3 commits began within 2 ms: 3 fit in a turn
    assert [w.done() and not w.cancelled() for w in waiters] == [False, True, True, True]
    assert turns.queued == 0


async def test_a_start_cancelled_while_queued_for_its_turn_still_completes(
    store_url: str, ms_turns: Turns
) -> None:
    # A request handed to the engine is finished by the engine: the caller of a start that
    # waits in the turn queue gives up, yet the run is written once and driven, and the same
    # key names the same run.
    from uuid import uuid5

    from rulebound.domain import WaitForSignal
    from rulebound.engine.engine import RUN_NAMESPACE

    wf = Workflow("approve", on_failure=FAIL, steps=[
        WaitForSignal("ok", signal="go", timeout=60, next=END)])
    turns = ms_turns
    engine = Engine(store_url, [wf], {})
    engine.turns = turns
    async with engine:
        for _ in range(3):
            assert turns.gate() is None  # this iteration's turn is used up

        def keep_queue_full() -> None:  # commits queued ahead, however long the wait
            while turns.queued < 100:
                assert turns.gate() is not None

        keep_queue_full()
        starting = asyncio.create_task(engine.start("approve", idempotency_key="k"))
        run_id = uuid5(RUN_NAMESPACE, "approve\x00k")
        for _ in range(3):
            keep_queue_full()
            await asyncio.sleep(0)
        assert not starting.done()
        starting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await starting
        assert await engine.start("approve", idempotency_key="k") == run_id
        waiting = asyncio.create_task(engine.wait(run_id))
        await engine.signal(run_id, "go")
        assert (await asyncio.wait_for(waiting, 5)).status == "completed"
        types = [e.type for e in await engine.events(run_id)]
    assert types[0] == "RunStarted" and types.count("RunStarted") == 1
    assert types[-1] == "RunCompleted"


async def test_turns_measure_their_own_commits_not_a_busy_neighbour(ms_turns: Turns) -> None:
    # Another part of the service spends 3 ms of every loop iteration. Queued commits are
    # still let through a turn's worth at a time (measured from the commits themselves), not
    # one per iteration, which made a burst of results crawl behind a busy neighbour.
    gate = Gate()
    release = gate.release
    engine = Engine("memory://", [gate.workflow], {"gated": gate})
    engine.turns = ms_turns
    async with engine:
        runs = await gate.start_all(engine)
        loop = asyncio.get_running_loop()
        before = engine.metrics.commits
        iterations = 0
        done = asyncio.Event()

        def busy_neighbour() -> None:  # 3 ms of someone else's work per iteration
            nonlocal iterations
            iterations += 1
            for _ in range(3):
                ms_turns.clock()
            if engine.metrics.commits - before < RUNS:
                loop.call_soon(busy_neighbour)
            else:
                done.set()

        release.set()
        loop.call_soon(busy_neighbour)
        await asyncio.wait_for(done.wait(), 10)
        views = [await engine.wait(r, timeout=10) for r in runs]
    assert all(v.status == "completed" for v in views)
    assert iterations <= RUNS // 2, (iterations, ms_turns.fit)


async def test_results_queued_for_their_turn_at_close_are_written_once(
    sqlite_url: str, ms_turns: Turns
) -> None:
    # Results that wait in the turn queue when the engine closes are not lost: the drain
    # waits for their attempts, and each is committed once (no attempt is run again).
    gate = Gate()
    engine = Engine(sqlite_url, [gate.workflow], {"gated": gate})
    engine.turns = ms_turns
    async with engine:
        runs = await gate.start_all(engine)
        gate.release.set()
        await asyncio.sleep(0)  # the executors return: a turn's worth (3) goes, the rest wait
        assert ms_turns.queued >= RUNS // 2  # still waiting for their turns at close
    async with Engine(sqlite_url, [gate.workflow], {"gated": gate}) as again:
        views = [await again.get(r) for r in runs]
        logs = [[e.type for e in await again.events(r)] for r in runs]
    assert all(v.status == "completed" for v in views), [v.status for v in views]
    assert all(t.count("AttemptStarted") == 1 and t.count("AttemptSucceeded") == 1
               for t in logs), logs
