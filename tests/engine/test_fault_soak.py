"""A randomized fault run: hundreds of runs through lost acknowledgements, cancelled callers,
store outages and engine restarts, on SQLite and on PostgreSQL.

Every run has plain steps, a parallel step and a signal wait; callers behave as real clients
do (they give up and retry, resend a signal whose answer they did not get); the store loses
about 5% of its acknowledgements and has 2-second outages; the engine is restarted several
times with attempts in flight. Then, from an execution ledger kept outside the engine and
from the stored logs:

- every run ended;
- no step whose success was stored ran again;
- re-executions never exceed the attempts that were in flight at the restarts;
- no signal id was recorded twice;
- every follower saw its run's whole log, in order, and ended.

The seed is printed (RULEBOUND_FAULT_SEED=N repeats the fault schedule; thread timing may
still vary); the figures are printed too, for the closing note.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

import pytest
from rulebound.adapters.stores import open_store

from rulebound import (
    END,
    FAIL,
    Engine,
    EngineClosed,
    FaultyStore,
    Limits,
    Parallel,
    Retry,
    RunTerminal,
    Step,
    StoreError,
    Task,
    WaitForSignal,
    Workflow,
)

RUNS = 200
START_RATE = 40  # runs started per second: traffic goes on through every fault
RESTARTS = 3
PHASE = 1.5  # seconds of traffic between restarts
OUTAGE = 2.0


def workflow() -> Workflow:
    retry = Retry(attempts=3, on=("rate_limited", "server_error"))  # the README's shape
    return Workflow("soak", on_failure=FAIL, limits=Limits(deadline=600), steps=[
        Step("a", executor="work", retry=retry, next="p"),
        Parallel("p", next="ok", branches=(
            Step("p1", executor="work", retry=retry), Step("p2", executor="work", retry=retry))),
        WaitForSignal("ok", signal="go", timeout=600, next="b"),
        Step("b", executor="work", retry=retry, next=END)])


@dataclass
class Figures:
    seed: int
    # (run, step, visit) -> the attempt numbers the executor was called with, in order
    executions: dict[tuple[str, str, int], list[int]] = field(default_factory=dict)
    in_flight_at_restarts: list[int] = field(default_factory=list)
    cancelled_callers: int = 0
    resent_signals: int = 0
    refused_during_outages: int = 0
    outages: int = 0
    lost_acks: int = 0
    followers_done: int = 0


class Soak:
    def __init__(self, url: str, seed: int) -> None:
        self.url = url
        self.rng = random.Random(seed)
        self.figures = Figures(seed)
        self.engine: Engine | None = None
        self.store: FaultyStore | None = None
        self.ready = asyncio.Event()  # an engine is open and taking requests
        self.ids: dict[int, UUID] = {}
        self.signalled: set[UUID] = set()
        self.followed: dict[UUID, list[int]] = {}
        self.generation = 0

    async def work(self, task: Task) -> Any:
        run, step, visit = task.idempotency_key.rsplit(":", 2)
        self.figures.executions.setdefault((run, step, int(visit)), []).append(task.attempt)
        await asyncio.sleep(self.rng.uniform(0.02, 0.15))
        return {"step": task.step}

    async def open_engine(self) -> None:
        """Open an engine on a fresh connection, as a supervisor would: again until it opens
        (an outage may be under way; a failed open leaves nothing behind)."""
        self.generation += 1
        store = FaultyStore(open_store(self.url), seed=self.figures.seed + self.generation,
                            lost_ack_rate=0.05, blocking=True, announce=None)
        engine = Engine(store, [workflow()], {"work": self.work}, drain_timeout=0.0)
        while True:
            try:
                await engine.open()
                break
            except StoreError:
                await asyncio.sleep(0.1)
        self.engine, self.store = engine, store
        self.ready.set()

    async def restart(self) -> None:
        assert self.engine is not None
        self.ready.clear()
        engine = self.engine
        self.figures.in_flight_at_restarts.append(engine.attempts_in_flight)
        await engine.close()  # drain_timeout=0: attempts in flight are cut off
        assert self.store is not None
        self.figures.lost_acks += self.store.injected["lost_ack"]
        await self.open_engine()

    async def call(self, make: Any) -> Any:
        """A client: retries what failed for want of an engine or a store; sometimes gives
        up on its own call half-way and sends it again (the same key or id)."""
        while True:
            await self.ready.wait()
            assert self.engine is not None
            task = asyncio.ensure_future(make(self.engine))
            if self.rng.random() < 0.1:
                await asyncio.sleep(self.rng.uniform(0, 0.01))
                if not task.done():
                    task.cancel()
                    self.figures.cancelled_callers += 1
            try:
                return await task
            except asyncio.CancelledError:
                continue  # we gave up waiting: ask again, with the same key
            except EngineClosed:
                await asyncio.sleep(0.05)
            except StoreError:
                self.figures.refused_during_outages += 1
                await asyncio.sleep(0.2)

    async def start_all(self) -> None:
        async def one(i: int) -> None:
            self.ids[i] = await self.call(
                lambda e: e.start("soak", {"i": i}, idempotency_key=f"soak-{i}"))

        starts = []
        for i in range(RUNS):
            starts.append(asyncio.create_task(one(i)))
            await asyncio.sleep(1 / START_RATE)
        await asyncio.gather(*starts)

    async def approve(self) -> None:
        """Answer every wait for "go", with one id per run; sometimes send it twice."""
        while len(self.signalled) < RUNS:
            await self.ready.wait()
            for run_id in list(self.ids.values()):
                if run_id in self.signalled:
                    continue
                try:
                    assert self.engine is not None
                    view = await self.engine.get(run_id)
                except (EngineClosed, StoreError):
                    break
                if view.status != "running":
                    self.signalled.add(run_id)
                    continue
                if "go" not in view.waiting_for:
                    continue
                times = 2 if self.rng.random() < 0.2 else 1
                self.figures.resent_signals += times - 1
                for _ in range(times):
                    with contextlib.suppress(RunTerminal):
                        await self.call(lambda e, r=run_id: e.signal(
                            r, "go", None, id=f"go-{r}"))
                self.signalled.add(run_id)
            await asyncio.sleep(0.05)

    async def follow(self, run_id: UUID) -> None:
        """A follower that survives restarts: it follows again after the last event seen."""
        seen = self.followed.setdefault(run_id, [])
        while True:
            await self.ready.wait()
            assert self.engine is not None
            try:
                async for seq, event in self.engine.follow(run_id, after=seen[-1] if seen
                                                           else 0):
                    seen.append(seq)
                    if event.type in ("RunCompleted", "RunFailed", "RunCancelled"):
                        self.figures.followers_done += 1
                        return
                return  # ended without a terminal event: the check below catches it
            except (EngineClosed, StoreError):
                await asyncio.sleep(0.05)

    async def chaos(self) -> None:
        """Outages now and then; restarts at fixed times."""
        for phase in range(RESTARTS):
            await asyncio.sleep(self.rng.uniform(0.2, 0.6))
            if self.store is not None and (phase == 0 or self.rng.random() < 0.8):
                self.store.outage(OUTAGE)
                self.figures.outages += 1
            await asyncio.sleep(PHASE)
            await self.restart()


async def soak(url: str) -> tuple[Figures, dict[UUID, list[Any]], Soak]:
    seed = int(os.environ.get("RULEBOUND_FAULT_SEED") or random.randrange(2**31))
    print(f"\nfault soak on {url.split(':')[0]}: seed {seed} (RULEBOUND_FAULT_SEED={seed} "
          "to repeat)")
    s = Soak(url, seed)
    await s.open_engine()
    starting = asyncio.create_task(s.start_all())
    chaos = asyncio.create_task(s.chaos())
    approving = asyncio.create_task(s.approve())
    await asyncio.sleep(0.5)
    followers = [asyncio.create_task(s.follow(r))
                 for r in s.rng.sample(list(s.ids.values()), min(20, len(s.ids)))]
    await starting
    rest = [r for r in s.ids.values() if r not in s.followed]
    followers += [asyncio.create_task(s.follow(r)) for r in s.rng.sample(rest, 20)]
    await chaos
    async with asyncio.timeout(240):
        await approving
        for run_id in s.ids.values():
            while True:
                await s.ready.wait()
                assert s.engine is not None
                try:
                    view = await s.engine.wait(run_id, timeout=60)
                    break
                except (EngineClosed, StoreError):
                    await asyncio.sleep(0.1)
            assert view.status == "completed", (seed, run_id, view.status, view.reason)
    async with asyncio.timeout(30):  # no follower hangs
        await asyncio.gather(*followers)
    assert s.engine is not None
    logs = {r: await s.engine.events(r) for r in s.ids.values()}
    await s.engine.close()
    assert s.store is not None
    s.figures.lost_acks += s.store.injected["lost_ack"]
    return s.figures, logs, s


def check(figures: Figures, logs: dict[UUID, list[Any]], s: Soak) -> dict[str, Any]:
    seed = figures.seed
    succeeded: dict[tuple[str, str, int], int] = {}
    abandoned = 0
    for run_id, events in logs.items():
        visit: dict[str, int] = {}
        signal_ids = Counter(e.signal_id for e in events
                             if e.type == "SignalReceived" and e.signal_id is not None)
        assert all(n == 1 for n in signal_ids.values()), (seed, run_id, signal_ids)
        for e in events:
            if e.type == "StepScheduled":
                visit[e.step] = e.visit
            elif e.type == "AttemptSucceeded":
                succeeded[(str(run_id), e.step, visit[e.step])] = e.attempt
            elif e.type == "AttemptAbandoned":
                abandoned += 1
    # Executors never fail here: every execution past the first of a (run, step, visit) is a
    # re-execution, and only an attempt cut off by a restart may be executed again. No
    # attempt may have been executed after its visit's success was stored (a success stored
    # ends the visit: a later execution would have to be an attempt numbered after it).
    reexecutions = sum(len(attempts) - 1 for attempts in figures.executions.values())
    in_flight = sum(figures.in_flight_at_restarts)
    assert reexecutions <= in_flight, (seed, reexecutions, figures.in_flight_at_restarts)
    for key, attempts in figures.executions.items():
        assert key in succeeded, (seed, key, "executed but never succeeded")
        assert max(attempts) <= succeeded[key], (seed, key, "ran again after its success")
        assert len(set(attempts)) == len(attempts), (seed, key, "one attempt executed twice")
    for run_id, seen in s.followed.items():
        assert seen == list(range(1, len(logs[run_id]) + 1)), (seed, run_id, "follower gap")
    return {
        "seed": seed, "runs": len(logs), "runs_completed": len(logs),
        "executions": sum(len(a) for a in figures.executions.values()),
        "reexecutions": reexecutions,
        "in_flight_at_restarts": figures.in_flight_at_restarts, "abandoned": abandoned,
        "cancelled_callers": figures.cancelled_callers, "resent_signals": figures.resent_signals,
        "lost_acks": figures.lost_acks, "outages": figures.outages,
        "refused_during_outages": figures.refused_during_outages,
        "followers": len(s.followed), "followers_done": figures.followers_done,
    }


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def test_no_fault_strands_a_run(kind: str, request: pytest.FixtureRequest,
                                      tmp_path: Any) -> None:
    url = (f"sqlite:///{tmp_path / 'soak.db'}" if kind == "sqlite"
           else str(request.getfixturevalue("postgres_url")))
    figures, logs, s = await soak(url)
    summary = check(figures, logs, s)
    print(f"fault soak on {kind}: {summary}")
    assert summary["followers_done"] == summary["followers"]
    assert summary["lost_acks"] > 0 and summary["outages"] > 0, "the faults did not happen"
