"""A burst of results is committed over several loop iterations, so the loop stays responsive.

The turn clock (`engine.engine._perf_counter`) is driven by the test: every reading advances
1 ms, so three commits fit in a 2 ms turn whatever the machine's speed. Nothing here is timed.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import pytest
import rulebound.engine.engine as engine_module
from rulebound.domain import END, FAIL, Step, Workflow
from rulebound.engine import Engine, Task

RUNS = 20


@pytest.fixture
def ms_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    ticks = itertools.count()
    monkeypatch.setattr(engine_module, "_perf_counter", lambda: next(ticks) * 0.001)


class Gate:
    """An executor whose attempts all wait for one release, so their results land at once."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.all_started = asyncio.Event()
        self.started = 0
        self.workflow = Workflow("burst", on_failure=FAIL,
                                 steps=[Step("only", executor="gated", next=END)])

    async def __call__(self, task: Task) -> Any:
        self.started += 1
        if self.started == RUNS:
            self.all_started.set()
        await self.release.wait()
        return {"n": 1}

    async def start_all(self, engine: Engine) -> list[Any]:
        runs = [await engine.start("burst") for _ in range(RUNS)]
        await asyncio.wait_for(self.all_started.wait(), 10)
        return runs


async def test_a_burst_of_results_is_committed_over_several_iterations(
    store_url: str, ms_clock: None
) -> None:
    gate = Gate()
    release = gate.release
    async with Engine(store_url, [gate.workflow], {"gated": gate}) as engine:
        runs = await gate.start_all(engine)
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
        waiters[0].cancel()  # type: ignore[union-attr]
        engine._end_turn()
        assert engine._fit == 3  # 3 commits began within 2 ms: 3 fit in a turn
        assert [w.done() and not w.cancelled() for w in waiters] == [False, True, True, True]
        assert not engine._deferred


async def test_a_start_cancelled_in_the_queue_leaves_no_half_run(
    store_url: str, ms_clock: None
) -> None:
    # A start queued for its turn is cancelled while a signal waits on the new run's lock and
    # a `wait` waits for its end: both must get RunNotFound (not act on, or hang on, a run
    # that was never written), nothing is stored, and the same key starts cleanly afterwards.
    from uuid import uuid5

    from rulebound.domain import WaitForSignal
    from rulebound.domain.errors import RunNotFound
    from rulebound.engine.engine import RUN_NAMESPACE

    wf = Workflow("approve", on_failure=FAIL, steps=[
        WaitForSignal("ok", signal="go", timeout=60, next=END)])
    async with Engine(store_url, [wf], {}) as engine:
        for _ in range(3):
            assert engine._turn() is None  # this iteration's turn is used up

        def keep_queue_full() -> None:  # commits queued ahead, however long the wait
            while len(engine._deferred) < 100:
                assert engine._turn() is not None

        keep_queue_full()
        starting = asyncio.create_task(engine.start("approve", idempotency_key="k"))
        run_id = uuid5(RUN_NAMESPACE, "approve\x00k")
        # Until the start is queued for its first write. The queue is topped up on every loop
        # iteration: the turns release a few waiters per iteration, and spin while any wait.
        loop = asyncio.get_running_loop()
        give_up = loop.time() + 10
        while run_id not in engine._runs and loop.time() < give_up:
            keep_queue_full()
            await asyncio.sleep(0)
        # From entering _runs to queuing for its turn the start does not yield.
        assert run_id in engine._runs and not starting.done()
        signalling = asyncio.create_task(engine.signal(run_id, "go"))
        waiting = asyncio.create_task(engine.wait(run_id))
        for _ in range(3):
            keep_queue_full()
            await asyncio.sleep(0)
        assert not starting.done()
        starting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await starting
        with pytest.raises(RunNotFound):
            await asyncio.wait_for(signalling, 5)
        with pytest.raises(RunNotFound):
            await asyncio.wait_for(waiting, 5)
        assert await engine.storage.read(run_id, 0) == []
        assert await engine.start("approve", idempotency_key="k") == run_id
        await engine.signal(run_id, "go")
        assert (await engine.wait(run_id, timeout=5)).status == "completed"


async def test_a_start_cancelled_mid_write_is_taken_up_when_the_write_lands(
    sqlite_url: str,
) -> None:
    # The first write was handed to the writer thread, then the caller gave up: the write
    # lands anyway, so the run exists; the engine that wrote it must drive it (once, even
    # when the caller starts the same key again meanwhile), not forget it until restart.
    import threading
    from uuid import uuid5

    from rulebound.domain import Retry
    from rulebound.domain.errors import RunNotFound
    from rulebound.engine.engine import RUN_NAMESPACE

    async def done(task: Task) -> Any:
        return {"ok": True}

    wf = Workflow("one", on_failure=FAIL, steps=[
        Step("only", executor="done", retry=Retry(attempts=2, backoff=0), next=END)])
    entered, release = threading.Event(), threading.Event()
    async with Engine(sqlite_url, [wf], {"done": done}) as engine:
        store = engine.storage.store
        real_append = store.append

        def held_append(records: Any) -> None:  # runs on the writer thread
            entered.set()
            release.wait(10)
            real_append(records)

        store.append = held_append  # type: ignore[method-assign]
        starting = asyncio.create_task(engine.start("one", idempotency_key="k"))
        run_id = uuid5(RUN_NAMESPACE, "one\x00k")
        for _ in range(1000):
            if entered.is_set():
                break
            await asyncio.sleep(0.005)
        assert entered.is_set()
        waiting = asyncio.create_task(engine.wait(run_id, timeout=20))
        await asyncio.sleep(0.01)
        starting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await starting
        # The caller retries with the same key while the first write is still in flight.
        again = asyncio.create_task(engine.start("one", idempotency_key="k"))
        await asyncio.sleep(0.01)
        store.append = real_append  # type: ignore[method-assign]
        release.set()
        assert await asyncio.wait_for(again, 10) == run_id
        # Whoever waited all along sees the run end: not RunNotFound while the write was
        # in flight, not a hang on an object the engine dropped.
        assert (await waiting).status == "completed"
        status = None
        for _ in range(500):
            try:
                status = (await engine.get(run_id)).status
            except RunNotFound:
                status = None
            if status == "completed":
                break
            await asyncio.sleep(0.02)
        assert status == "completed"
        types = [e.type for e in await engine.events(run_id)]
    # The attempt the first write started never ran here: it is abandoned, then retried.
    assert types[:3] == ["RunStarted", "StepScheduled", "AttemptStarted"]
    assert "AttemptAbandoned" in types and types[-1] == "RunCompleted"


async def test_turns_measure_their_own_commits_not_a_busy_neighbour(ms_clock: None) -> None:
    # Another part of the service spends 3 ms of every loop iteration. Queued commits are
    # still let through a turn's worth at a time (measured from the commits themselves), not
    # one per iteration, which made a burst of results crawl behind a busy neighbour.
    gate = Gate()
    release = gate.release
    async with Engine("memory://", [gate.workflow], {"gated": gate}) as engine:
        runs = await gate.start_all(engine)
        loop = asyncio.get_running_loop()
        before = engine.metrics.commits
        iterations = 0
        done = asyncio.Event()

        def busy_neighbour() -> None:  # 3 ms of someone else's work per iteration
            nonlocal iterations
            iterations += 1
            for _ in range(3):
                engine_module._perf_counter()
            if engine.metrics.commits - before < RUNS:
                loop.call_soon(busy_neighbour)
            else:
                done.set()

        release.set()
        loop.call_soon(busy_neighbour)
        await asyncio.wait_for(done.wait(), 10)
        views = [await engine.wait(r, timeout=10) for r in runs]
    assert all(v.status == "completed" for v in views)
    assert iterations <= RUNS // 2, (iterations, engine._fit)
