"""Parked runs with several engines on PostgreSQL: the races a review found (a former
owner's late unpark, a stale parking row after a takeover, a signal appended while the owner
loads its parked run, copies kept on a replica). Each test failed before its fix."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import Counter
from typing import Any

import pytest
from rulebound.adapters.stores import open_store

from rulebound import END, FAIL, Engine, FaultyStore, Retry, RetryableError, Step, Task, Workflow
from tests.shards import owned_run

LEASE = 1.0


async def until(predicate: Any, within: float, step: float = 0.02) -> None:
    async with asyncio.timeout(within):
        while not predicate():
            await asyncio.sleep(step)


@pytest.mark.postgres
async def test_a_former_owners_late_unpark_keeps_the_new_owners_parking_row(
        postgres_url: str) -> None:
    # B holds a copy of a run A parked (a waiter) and takes A's shards when A closes; B's
    # removal of the parking row (as it drives its copy, or as its poll finds the row due)
    # is in flight when B loses the shard to C. C listed the run as parked (runs_to_recover
    # leaves it out) and waits for the row. Unfenced, B's late delete lands and nobody
    # wakes the run again: its retry never runs. Fenced, it removes nothing.
    calls: Counter[str] = Counter()

    async def flaky(task: Task) -> Any:
        calls[str(task.run_id)] += 1
        if calls[str(task.run_id)] == 1:
            raise RetryableError("not yet", retry_after=4.0)  # past park_after: parked
        return {"ok": True}

    wf = Workflow("later", on_failure=FAIL, steps=[
        Step("s", executor="flaky", retry=Retry(attempts=3, on=("error",)), next=END)])

    def make(store: Any, **options: Any) -> Engine:
        return Engine(store, [wf], {"flaky": flaky}, lease_time=LEASE, **options)

    faulty = FaultyStore(open_store(postgres_url), announce=None)
    async with make(faulty) as b:
        try:
            async with make(postgres_url, park_after=0.5) as a:
                await until(lambda: bool(a.ownership.held) and bool(b.ownership.held), 10)
                run_id = await owned_run(a, "later", cancel_others=False)  # the parking engine's
                await until(lambda: a.parked > 0, 10)  # its retry is 4 s away: parked
                waiting = asyncio.create_task(b.wait(run_id, timeout=60))  # B keeps a copy
                await until(lambda: b.active_runs > 0, 5)
                faulty.hold("unpark")
            # A closed: B takes every shard, drives its copy (the parking row stays), and its
            # poll finds the row due about a second before the retry: that unpark is held.
            await until(lambda: b.ownership.owns(run_id), 10)  # type: ignore[union-attr]
            assert await asyncio.to_thread(faulty.wait_held, 1, 10.0)
            # C's poll of due parkings comes after B's unpark lands (here: it fails until then;
            # in the wild: it polls once a second, and B's unpark was in flight at the hand-over).
            late = FaultyStore(open_store(postgres_url), announce=None)
            late.fail_next(100_000, method="parked_due")
            async with make(late) as c:
                faulty.fail_next(100_000, method="lease_cycle")  # B stops renewing: C takes all
                await until(lambda: c.ownership.owns(run_id)  # type: ignore[union-attr]
                            and not b.ownership.owns(run_id), 15)  # type: ignore[union-attr]
                await asyncio.sleep(1.0)  # C has listed its new shards' runs (R: parked)
                faulty.release()  # B's unpark lands; B no longer owns R and does nothing more
                await asyncio.sleep(0.5)
                late.heal()  # C polls the due parkings again
                try:
                    async with asyncio.timeout(10):
                        while (await c.get(run_id)).status != "completed":
                            await asyncio.sleep(0.1)
                finally:
                    faulty.heal()
                    waiting.cancel()
                    with contextlib.suppress(BaseException):
                        await waiting
            assert calls[str(run_id)] == 2
        finally:  # never close with a call held: the close would wait for it
            faulty.heal()


def approval() -> Workflow:
    from rulebound import WaitForSignal
    return Workflow("approval", on_failure=FAIL, steps=[
        Step("prepare", executor="work", next="ok"),
        WaitForSignal("ok", signal="go", timeout=600, next="after"),
        Step("after", executor="work", next=END)])


async def work(task: Task) -> Any:
    return {"step": task.step}


@pytest.mark.postgres
async def test_a_replica_does_not_keep_copies_of_runs_another_engine_parked(
        postgres_url: str) -> None:
    # A wait that timed out on a replica that does not own the run leaves the run's copy in
    # that replica's memory for as long as the run lives (parked on its owner for days,
    # say): nothing parks or drops an observed copy. They pile up, and count against the
    # replica's max_active_runs: it refuses new runs while it runs nothing.
    def make(**options: Any) -> Engine:
        return Engine(postgres_url, [approval()], {"work": work}, lease_time=LEASE, **options)

    async with make(park_after=0.2) as a, make(max_active_runs=5) as b:
        await until(lambda: bool(a.ownership.held) and bool(b.ownership.held), 10)
        owned = []
        for i in range(100):
            candidate = await a.start("approval", {"i": i})
            if a.ownership.owns(candidate):  # type: ignore[union-attr]
                owned.append(candidate)
            else:  # B's own run: ended, so only copies are left on B
                await a.cancel(candidate)
                await b.wait(candidate, timeout=10)
            if len(owned) == 5:
                break
        await until(lambda: a.parked >= 5, 10)
        assert b.active_runs == 0  # nothing of B's own is going
        for run_id in owned:
            with pytest.raises(TimeoutError):
                await b.wait(run_id, timeout=0.2)
        # let go once unused for a few seconds (not at once: a wait may be on its way)
        await until(lambda: b.active_runs == 0, 20)
        await b.start("approval", {"i": "new"})  # not refused: B runs nothing of its own


class Gated:
    """The approval workflow's executor; "after" waits for `gate` once it is set up."""

    def __init__(self) -> None:
        self.count: Counter[tuple[str, str]] = Counter()
        self.gate: asyncio.Event | None = None

    async def __call__(self, task: Task) -> Any:
        self.count[(str(task.run_id), task.step)] += 1
        if task.step == "after" and self.gate is not None:
            await self.gate.wait()
        return {"step": task.step}


@pytest.mark.postgres
@pytest.mark.parametrize("unpark_fails", [False, True])
async def test_a_copy_driven_on_taking_a_shard_is_recovered_by_the_next_owner(
        postgres_url: str, unpark_fails: bool) -> None:
    # B waited on a run A parked, so it keeps a copy; A closes and B takes its shards and
    # drives the copy. Driving it must remove A's parking row, and when that removal fails
    # (unpark_fails: a store fault, logged, nothing more) the row must not count either.
    # B then runs the run on (a signal, its next attempt) and dies mid-attempt. C takes the
    # shard: a listing that trusts the row ("parked until the wait's timeout, 600 s away")
    # leaves the run out, and the attempt B abandoned waits ten minutes. The row says which
    # version it parked; the log has grown past it, so C recovers the run at once.
    work = Gated()

    def make(store: Any, **options: Any) -> Engine:
        return Engine(store, [approval()], {"work": work}, lease_time=LEASE, **options)

    faulty = FaultyStore(open_store(postgres_url), announce=None)
    async with make(faulty) as b:
        try:
            async with make(postgres_url, park_after=0.2) as a:
                await until(lambda: bool(a.ownership.held) and bool(b.ownership.held), 10)
                run_id = await owned_run(a)  # a run of the parking engine (A)
                await until(lambda: a.parked > 0, 10)  # waiting for "go" (600 s): parked
                waiting = asyncio.create_task(b.wait(run_id, timeout=60))  # B keeps a copy
                await until(lambda: b.active_runs > 0, 5)
                if unpark_fails:
                    faulty.fail_next(100_000, method="unpark")  # B cannot remove the row
            # A closed: B takes its shards and drives its copy
            await until(lambda: b.ownership.owns(run_id), 10)  # type: ignore[union-attr]
            await asyncio.sleep(0.5)
            work.gate = asyncio.Event()
            await b.signal(run_id, "go", id="go-1")  # B owns it now: "after" starts on B
            await until(lambda: work.count[(str(run_id), "after")] == 1, 10)
            async with make(postgres_url) as c:
                faulty.fail_next(100_000, method="lease_cycle")  # B dies (stops renewing)
                await until(lambda: c.ownership.owns(run_id)  # type: ignore[union-attr]
                            and not b.ownership.owns(run_id), 15)  # type: ignore[union-attr]
                work.gate.set()
                try:
                    async with asyncio.timeout(10):  # well within 600 s
                        while (await c.get(run_id)).status != "completed":
                            await asyncio.sleep(0.1)
                finally:
                    waiting.cancel()
                    with contextlib.suppress(BaseException):
                        await waiting
        finally:  # never close with a fault in place that the close would wait on
            faulty.heal()


class LateRead(FaultyStore):
    """A read of `target` that returns late: what it read is older than what the store has
    by the time the caller sees it (a busy loop, a slow network)."""

    def __init__(self, inner: Any) -> None:
        super().__init__(inner, announce=None)
        self.target: Any = None
        self.entered = threading.Event()
        self.go = threading.Event()

    def read(self, run_id: Any, after: int = 0) -> Any:
        records = super().read(run_id, after)
        if run_id == self.target:
            self.target = None
            self.entered.set()
            self.go.wait(20)
        return records


@pytest.mark.postgres
async def test_a_signal_appended_while_the_owner_loads_its_parked_run_is_folded(
        postgres_url: str) -> None:
    # The owner takes a parked run up (here: for a wait on it). Another replica appends a
    # signal after the owner's load read the log but before the run is live: the owner's
    # change feed finds no live run and spawns _drive, which waits for the load, then finds
    # the run live and only reconciles it (run.reconcile is still True: the first commit
    # wrote nothing), without a reload: the signal stays unread until the wait's timeout.
    work = Gated()
    late = LateRead(open_store(postgres_url))

    def make(store: Any, **options: Any) -> Engine:
        return Engine(store, [approval()], {"work": work}, lease_time=LEASE, **options)

    async with make(late, park_after=0.2) as a, make(postgres_url) as b:
        await until(lambda: bool(a.ownership.held) and bool(b.ownership.held), 10)
        run_id = await owned_run(a)  # a run of the parking engine (A)
        await until(lambda: a.parked > 0, 10)
        late.target = run_id
        waiting = asyncio.create_task(a.wait(run_id, timeout=8))  # A takes it up
        try:
            assert await asyncio.to_thread(late.entered.wait, 5)  # A's load read the log
            await b.signal(run_id, "go", id="go-1")
            await asyncio.sleep(1.0)  # A's change feed hears of it (the run is not live yet)
        finally:
            late.go.set()
        assert (await waiting).status == "completed"
