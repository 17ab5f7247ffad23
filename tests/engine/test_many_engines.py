"""Several engines on one store: one writer per SQLite file; on PostgreSQL, shard leases,
fencing in the write itself, requests served by any replica, failover and hand-over.

Engines here run in one process, each on its own connection pool, with short leases; the
multi-process test with kill -9 and SIGSTOP is test_cluster.py.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from rulebound.adapters.cli import main
from rulebound.adapters.stores import open_store

from rulebound import (
    END,
    FAIL,
    Engine,
    FaultyStore,
    RateLimit,
    Retry,
    RetryableError,
    Step,
    StoreError,
    Task,
    WaitForSignal,
    Workflow,
)
from tests.shards import owned_run

LEASE = 1.0  # seconds: takeovers within a test's patience


class Work:
    """Counts executions per (run, step) across every engine of a test."""

    def __init__(self) -> None:
        self.count: Counter[tuple[str, str]] = Counter()
        self.gate: asyncio.Event | None = None

    async def __call__(self, task: Task) -> Any:
        self.count[(str(task.run_id), task.step)] += 1
        if self.gate is not None:
            await self.gate.wait()
        return {"step": task.step}


def approval() -> Workflow:
    return Workflow("approval", on_failure=FAIL, steps=[
        Step("prepare", executor="work", next="ok"),
        WaitForSignal("ok", signal="go", timeout=600, next="after"),
        Step("after", executor="work", next=END)])


def engine(url_or_store: Any, work: Work, **options: Any) -> Engine:
    options.setdefault("lease_time", LEASE)
    return Engine(url_or_store, [approval()], {"work": work}, **options)


async def balanced(*engines: Engine) -> None:
    """Until the engines hold disjoint shares that cover every shard."""
    async with asyncio.timeout(10 * LEASE):
        while True:
            held = [set(e.ownership.held) for e in engines if e.ownership is not None]
            every = set().union(*held)
            if (len(held) == len(engines) and all(held)
                    and sum(len(h) for h in held) == len(every) == 64):
                return
            await asyncio.sleep(0.05)


# --- SQLite: one writing engine per file ----------------------------------------------------

async def test_a_second_engine_on_one_sqlite_file_is_refused_naming_the_holder(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 'one.db'}"
    work = Work()
    async with engine(url, work) as first:
        run_id = await first.start("approval")
        second = engine(url, work)
        with pytest.raises(StoreError, match=r"in use by another engine \(pid \d+ on .+ since"):
            await second.open()
        # Readers work beside the live engine.
        async with Engine(url, read_only=True) as reader:
            assert (await reader.get(run_id)).status == "running"
        assert await asyncio.to_thread(main, ["show", str(run_id), "--store", url]) == 0
        assert str(run_id) in capsys.readouterr().out
        await first.cancel(run_id)
    async with engine(url, work) as again:  # closed: the next engine takes the file
        assert (await again.get(run_id)).status == "cancelled"


# --- PostgreSQL: many engines ------------------------------------------------------------------

@pytest.mark.postgres
async def test_two_engines_share_the_shards_and_any_replica_serves_any_run(
        postgres_url: str) -> None:
    work = Work()
    async with engine(postgres_url, work) as a, engine(postgres_url, work) as b:
        await balanced(a, b)
        runs = [await (a if i % 2 else b).start("approval", {"i": i}) for i in range(20)]
        assert {a.ownership.owns(r) for r in runs} == {True, False}  # type: ignore[union-attr]
        for i, run_id in enumerate(runs):  # signals through the other replica, or the same
            replica = b if i % 3 else a
            async with asyncio.timeout(10):
                while "go" not in (await replica.get(run_id)).waiting_for:
                    await asyncio.sleep(0.02)
            await replica.signal(run_id, "go", id=f"go-{i}")
        for i, run_id in enumerate(runs):  # and every replica sees every end
            for replica in (a, b):
                assert (await replica.wait(run_id, timeout=10)).status == "completed", i
    assert all(n == 1 for n in work.count.values()) and len(work.count) == 40


@pytest.mark.postgres
async def test_a_dead_owners_runs_are_taken_over_within_the_lease(postgres_url: str) -> None:
    work, stuck = Work(), Work()
    stuck.gate = asyncio.Event()  # the dead engine's attempts never finish
    dying = FaultyStore(open_store(postgres_url), announce=None)
    async with engine(dying, stuck) as a, engine(postgres_url, work) as b:
        await balanced(a, b)
        runs = [await a.start("approval", {"i": i}) for i in range(12)]
        theirs = [r for r in runs if a.ownership.owns(r)]  # type: ignore[union-attr]
        async with asyncio.timeout(10):
            while sum(n for (r, _), n in stuck.count.items()) < len(theirs):
                await asyncio.sleep(0.02)
        died = time.monotonic()
        dying.outage(3600)  # the owner can no longer reach the store: it is gone
        for run_id in theirs:
            async with asyncio.timeout(10 * LEASE):
                while "go" not in (await b.get(run_id)).waiting_for:
                    await asyncio.sleep(0.02)
        took = time.monotonic() - died
        assert a.ownership is not None and not a.ownership.held  # it fenced itself
        for run_id in theirs:
            await b.signal(run_id, "go")
            assert (await b.wait(run_id, timeout=10)).status == "completed"
        for run_id in theirs:  # the step cut off by the death ran again, on the new owner
            types = [e.type for e in await b.events(run_id)]
            assert "AttemptAbandoned" in types, types
        dying.heal()
    assert took < 4 * LEASE, took
    print(f"failover: {took:.2f} s with a {LEASE:g} s lease")


@pytest.mark.postgres
async def test_a_paused_owners_late_write_is_refused_by_fencing(postgres_url: str) -> None:
    slow, work = Work(), Work()
    slow.gate = asyncio.Event()
    paused = FaultyStore(open_store(postgres_url), announce=None)
    async with engine(paused, slow) as a, engine(postgres_url, work) as b:
        await balanced(a, b)
        run_id = await owned_run(a)
        async with asyncio.timeout(10):
            while slow.count[(str(run_id), "prepare")] == 0:
                await asyncio.sleep(0.02)
        paused.hold("append")  # its next write stops in flight, as in a paused process
        paused.fail_next(10_000, method="lease_cycle")  # and it cannot renew
        slow.gate.set()  # the result is ready and handed to the (held) writer
        assert await asyncio.to_thread(paused.wait_held, 1, 10.0)
        async with asyncio.timeout(10 * LEASE):  # the other engine took the run over
            while "go" not in (await b.get(run_id)).waiting_for:
                await asyncio.sleep(0.02)
        paused.release()  # the paused owner wakes up and its write goes to the store
        async with asyncio.timeout(10):
            while a.storage.fenced == 0:
                await asyncio.sleep(0.02)
        events = await b.events(run_id)
        paused.fail_next(0, method="lease_cycle")
    succeeded = [e for e in events if e.type == "AttemptSucceeded"]
    assert len(succeeded) == 1  # the new owner's re-run; the paused one's never landed
    assert succeeded[0].attempt == 2 and work.count[(str(run_id), "prepare")] == 1


@pytest.mark.postgres
async def test_a_signal_appended_by_another_replica_while_its_owner_parks_the_run_is_answered(
        postgres_url: str) -> None:
    # The owner parks a run that waits for a signal (moves it out of memory); a signal that
    # another replica appends while that parking is being written must still be answered,
    # not left in the log until the wait's timeout.
    work = Work()
    parking = FaultyStore(open_store(postgres_url), announce=None)
    async with engine(parking, work, park_after=0.2) as a, engine(postgres_url, work) as b:
        await balanced(a, b)
        parking.hold("park")
        run_id = await owned_run(a)
        assert await asyncio.to_thread(parking.wait_held, 1, 10.0)  # its parking in flight
        await b.signal(run_id, "go", id="go-1")
        await asyncio.sleep(1.0)  # the owner's change feed hears of it meanwhile
        parking.release()
        assert (await b.wait(run_id, timeout=10)).status == "completed"
        assert (await a.wait(run_id, timeout=10)).status == "completed"


@pytest.mark.postgres
async def test_a_signal_to_a_parked_run_is_answered_even_if_its_owner_misses_the_change(
        postgres_url: str) -> None:
    # The change feed is how an owner hears of a request another replica appended, but a
    # note can be missed (the shard changing hands as it arrives, here a feed that cannot
    # read): the request also makes the run's parking due, so the owner's poll loads it.
    work = Work()
    blind = FaultyStore(open_store(postgres_url), announce=None)
    async with engine(blind, work, park_after=0.2) as a, engine(postgres_url, work) as b:
        await balanced(a, b)
        run_id = await owned_run(a)
        async with asyncio.timeout(10):
            while a.parked == 0:
                await asyncio.sleep(0.02)
        blind.fail_next(10_000, method="read_all")  # its change feed reads nothing now
        await b.signal(run_id, "go", id="go-1")
        assert (await b.wait(run_id, timeout=10)).status == "completed"
        blind.heal()


@pytest.mark.postgres
async def test_a_parked_run_signalled_through_the_engine_that_takes_it_over_is_answered(
        postgres_url: str) -> None:
    # B signals a run A owns and parked; A misses it (its feed and its poll fail) and hands
    # its shards over on close. B kept a copy of the run for the request: on taking the shard
    # it must drive that copy, though the store lists the run as parked.
    work = Work()
    blind = FaultyStore(open_store(postgres_url), announce=None)
    async with engine(postgres_url, work) as b:
        async with engine(blind, work, park_after=0.2) as a:
            await balanced(a, b)
            run_id = await owned_run(a)
            async with asyncio.timeout(10):
                while a.parked == 0:
                    await asyncio.sleep(0.02)
            blind.fail_next(10_000, method="read_all")
            blind.fail_next(10_000, method="parked_due")
            await b.signal(run_id, "go", id="go-1")
            await asyncio.sleep(0.5)
            assert "go" in (await b.get(run_id)).waiting_for  # nobody decided yet
        blind.heal()
        assert (await b.wait(run_id, timeout=10)).status == "completed"


@pytest.mark.postgres
async def test_a_replica_that_waits_on_a_run_parked_by_its_owner_leaves_it_parked(
        postgres_url: str) -> None:
    # A parked run's due time lives in the store's parking row. A wait (or a follow) on
    # another replica must not take that row away: the owner would then never wake the run.
    calls: Counter[str] = Counter()

    async def flaky(task: Task) -> Any:
        calls[str(task.run_id)] += 1
        if calls[str(task.run_id)] == 1:
            raise RetryableError("not yet", retry_after=1.5)  # a backoff past park_after
        return {"ok": True}

    wf = Workflow("later", on_failure=FAIL, steps=[
        Step("s", executor="flaky", retry=Retry(attempts=3, on=("error",)), next=END)])

    def make(**options: Any) -> Engine:
        return Engine(postgres_url, [wf], {"flaky": flaky}, lease_time=LEASE, **options)

    async with make(park_after=0.5) as a, make() as b:
        await balanced(a, b)
        run_id = await owned_run(a, "later", cancel_others=False)
        async with asyncio.timeout(10):
            while a.parked == 0:  # its retry is 1.5 s away: the owner parked it
                await asyncio.sleep(0.02)
        assert (await b.wait(run_id, timeout=10)).status == "completed"
        assert calls[str(run_id)] == 2


@pytest.mark.postgres
async def test_a_graceful_close_hands_its_shards_over_at_once(postgres_url: str) -> None:
    # A long lease, so that "at once" (b's next renewal, every lease / 4) and "when the
    # leases expire" (at least 3/4 of a lease after a's last renewal) are far apart.
    work, lease = Work(), 6.0
    async with engine(postgres_url, work, lease_time=lease) as b:
        async with engine(postgres_url, work, lease_time=lease) as a:
            async with asyncio.timeout(5 * lease):
                while not (a.ownership and b.ownership and len(a.ownership.held) == 32
                           and len(b.ownership.held) == 32):
                    await asyncio.sleep(0.05)
            runs = [await a.start("approval", {"i": i}) for i in range(8)]
        closed = time.monotonic()
        async with asyncio.timeout(2 * lease):
            while b.ownership is None or len(b.ownership.held) < 64:
                await asyncio.sleep(0.02)
        took = time.monotonic() - closed
        for run_id in runs:
            async with asyncio.timeout(10):
                while "go" not in (await b.get(run_id)).waiting_for:
                    await asyncio.sleep(0.02)
            await b.signal(run_id, "go")
            assert (await b.wait(run_id, timeout=10)).status == "completed"
    print(f"hand-over on close: {took:.2f} s with a {lease:g} s lease")
    assert took < lease / 2, took  # at b's next renewal, not when the leases would expire


@pytest.mark.postgres
async def test_a_rate_limit_holds_across_engines(postgres_url: str) -> None:
    # 5 requests a second for the executor, on two engines. The shared windows are fixed
    # seconds of the database clock, so 20 calls need 4 of them: the first call falls
    # anywhere in its window, and the last window starts more than 2 s after it. Each
    # engine's own window alone would let 10 a second through: about 1 s for all 20.
    calls: list[float] = []

    async def limited(task: Task) -> Any:
        calls.append(time.monotonic())
        return {}

    wf = Workflow("limited", on_failure=FAIL, steps=[Step("s", executor="lim", next=END)])
    limits = {"lim": RateLimit(requests=5, per=1.0)}

    def make() -> Engine:
        return Engine(postgres_url, [wf], {"lim": limited}, rate_limits=limits,
                      lease_time=LEASE)

    async with make() as a, make() as b:
        await balanced(a, b)
        began = time.monotonic()
        runs = [await (a if i % 2 else b).start("limited", {"i": i}) for i in range(20)]
        for run_id in runs:
            assert (await a.wait(run_id, timeout=30)).status == "completed"
        took = time.monotonic() - began
    assert len(calls) == 20
    assert took > 1.9, took  # the shared windows held the pace (a little slack for
    # the time between a claim and its executor's call)
    print(f"20 calls at 5/s across 2 engines took {took:.2f} s")


@pytest.mark.postgres
async def test_opening_and_closing_engines_on_postgresql_does_not_grow_the_process(
        postgres_url: str) -> None:
    # Each open used to fetch the store's composite type anew, and psycopg keeps the classes
    # it builds per fetched type without bound: 14.5 KiB and 152 objects per open and close.
    import gc
    import tracemalloc

    work = Work()

    async def cycle() -> None:
        async with engine(postgres_url, work):
            pass

    for _ in range(5):  # caches that fill once
        await cycle()
    gc.collect()
    tracemalloc.start()
    try:
        before, objects = tracemalloc.take_snapshot(), len(gc.get_objects())
        for _ in range(20):
            await cycle()
        gc.collect()
        after, grown = tracemalloc.take_snapshot(), len(gc.get_objects()) - objects
    finally:
        tracemalloc.stop()
    size = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    print(f"per open and close: {size / 20 / 1024:.1f} KiB, {grown / 20:.1f} objects")
    assert size / 20 < 5 * 1024 and grown / 20 < 60, (size / 20, grown / 20)


@pytest.mark.postgres
async def test_shards_taken_by_a_lease_cycle_whose_answer_was_lost_are_taken_again(
        postgres_url: str) -> None:
    # B's lease cycle takes the shards A gave up as it closed, and its answer is lost: the
    # store records B as their owner and B does not know it. Those shards must not sit idle
    # (their runs undecided) until that lease runs out: B's next cycle takes them again.
    lease = 10.0  # a cycle every 2.5 s; the lease B does not know of lasts 10 s
    work = Work()
    faulty = FaultyStore(open_store(postgres_url), announce=None)
    async with engine(faulty, work, lease_time=lease) as b:
        try:
            async with engine(postgres_url, work, lease_time=lease) as a:
                async with asyncio.timeout(30):
                    while not (a.ownership.held and b.ownership.held  # type: ignore[union-attr]
                               and len(a.ownership.held)  # type: ignore[union-attr]
                               + len(b.ownership.held) == 64):  # type: ignore[union-attr]
                        await asyncio.sleep(0.05)
                faulty.hold("lease_cycle")  # B's next cycle waits until A has gone
                assert await asyncio.to_thread(faulty.wait_held, 1, 10.0)
            faulty.lose_acks(1, method="lease_cycle")
            released = time.monotonic()
            faulty.release()  # that cycle takes A's shards; B does not hear of it
            async with asyncio.timeout(30):
                while len(b.ownership.held) < 64:  # type: ignore[union-attr]
                    await asyncio.sleep(0.05)
            took = time.monotonic() - released
        finally:
            faulty.heal()
    print(f"B held every shard {took:.1f} s after its lost cycle (lease {lease:.0f} s)")
    assert took < 0.8 * lease, took  # the next cycle (2.5 s), not the lease's end (10 s)
