"""No fault strands a run: the engine under the faults a service meets between crashes.

Each test drives a real Engine over a real store (memory, SQLite, PostgreSQL) wrapped in
`FaultyStore`, and injects one fault at the moment that used to break a guarantee: a caller
cancelled while its write is in flight, a lost acknowledgement, a store outage while a
result is being written, a failing recovery, a follower whose run ends while the engine can
only learn of it by reading the log back.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest
from pydantic import BaseModel
from rulebound.adapters.stores import open_store
from rulebound.engine.store import Record

from rulebound import (
    END,
    FAIL,
    CorruptRun,
    DefinitionError,
    Engine,
    EngineClosed,
    FaultyStore,
    IdempotencyConflict,
    InvalidInput,
    PermanentError,
    RunTerminal,
    Step,
    StoreUnavailable,
    Task,
    WaitForSignal,
    Workflow,
)


class Approval(BaseModel):
    approved: bool


class Calls:
    """An executor that counts its calls per step (what ran, independently of the log)."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.count: Counter[str] = Counter()

    async def __call__(self, task: Task) -> Any:
        self.count[task.step] += 1
        await asyncio.sleep(self.delay)
        return {"step": task.step}


def approval() -> Workflow:
    return Workflow("approval", on_failure=FAIL, steps=[
        Step("prepare", executor="work", next="ok"),
        WaitForSignal("ok", signal="go", output=Approval, timeout=60, next="after"),
        Step("after", executor="work", next=END)])


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def durable_url(request: pytest.FixtureRequest, tmp_path: Any) -> str:
    """A store that outlives its engine (what a restart needs)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'runs.db'}"
    return str(request.getfixturevalue("postgres_url"))


def faulty(store_url: str, **options: Any) -> FaultyStore:
    # An in-memory store is called inline on the loop; a hold needs it on the store threads.
    return FaultyStore(open_store(store_url), blocking=True, announce=None, **options)


async def until(predicate: Any) -> None:
    async with asyncio.timeout(10):
        while not await predicate():
            await asyncio.sleep(0.01)


async def waiting_for_go(engine: Engine, run_id: Any) -> None:
    async def check() -> bool:
        return "go" in (await engine.get(run_id)).waiting_for
    await until(check)


async def held(store: FaultyStore) -> None:
    assert await asyncio.to_thread(store.wait_held, 1, 10.0), "no append reached the store"


# --- 1. a caller cancelled while its write is in flight ---------------------------------------

async def test_a_signal_whose_caller_gave_up_mid_write_still_moves_the_run(
        store_url: str) -> None:
    store, work = faulty(store_url), Calls()
    async with Engine(store, [approval()], {"work": work}) as engine:
        run_id = await engine.start("approval")
        await waiting_for_go(engine, run_id)
        store.hold()
        sending = asyncio.create_task(engine.signal(run_id, "go", {"approved": True}))
        await held(store)  # the write (with the next step's AttemptStarted) is in flight
        sending.cancel()
        store.release()
        with pytest.raises(asyncio.CancelledError):
            await sending
        view = await engine.wait(run_id, timeout=10)
    assert view.status == "completed"
    assert work.count["after"] == 1  # launched by the engine, though its caller had gone


async def test_a_cancel_whose_caller_gave_up_mid_write_still_ends_the_run(
        store_url: str) -> None:
    store = faulty(store_url)
    async with Engine(store, [approval()], {"work": Calls()}) as engine:
        run_id = await engine.start("approval")
        await waiting_for_go(engine, run_id)
        waiting = asyncio.create_task(engine.wait(run_id, timeout=10))
        store.hold()
        cancelling = asyncio.create_task(engine.cancel(run_id, "no longer needed"))
        await held(store)
        cancelling.cancel()
        store.release()
        with pytest.raises(asyncio.CancelledError):
            await cancelling
        assert (await waiting).status == "cancelled"  # a waiter is not left hanging


async def test_a_start_whose_caller_gave_up_mid_write_runs_once(store_url: str) -> None:
    store, work = faulty(store_url), Calls()
    wf = Workflow("one", on_failure=FAIL, steps=[Step("only", executor="work", next=END)])
    async with Engine(store, [wf], {"work": work}) as engine:
        store.hold()
        starting = asyncio.create_task(engine.start("one", {"n": 1}, idempotency_key="k"))
        await held(store)
        starting.cancel()
        # The caller retries with the same key while the first write is still in flight.
        again = asyncio.create_task(engine.start("one", {"n": 1}, idempotency_key="k"))
        await asyncio.sleep(0.05)
        store.release()
        with pytest.raises(asyncio.CancelledError):
            await starting
        run_id = await asyncio.wait_for(again, 10)
        view = await engine.wait(run_id, timeout=10)
        types = [e.type for e in await engine.events(run_id)]
    assert view.status == "completed"
    assert types.count("RunStarted") == 1 and "AttemptAbandoned" not in types
    assert work.count["only"] == 1


# --- 2. a lost acknowledgement -------------------------------------------------------------

@pytest.mark.parametrize("error", ["unavailable", "conflict"])
async def test_a_start_and_a_signal_whose_acknowledgements_are_lost_are_recorded_once(
        store_url: str, error: Any) -> None:
    store, work = faulty(store_url), Calls()
    async with Engine(store, [approval()], {"work": work}) as engine:
        store.lose_acks(1, error=error)
        run_id = await engine.start("approval", idempotency_key="ticket-1")
        await waiting_for_go(engine, run_id)  # taken as ours and driven, not stranded
        store.lose_acks(1, error=error)
        await engine.signal(run_id, "go", {"approved": True}, id="approval-1")
        # The client did not trust the answer and sends the same signal again.
        await engine.signal(run_id, "go", {"approved": True}, id="approval-1")
        view = await engine.wait(run_id, timeout=10)
        types = [e.type for e in await engine.events(run_id)]
    assert store.injected["lost_ack"] == 2
    assert view.status == "completed"
    assert types.count("RunStarted") == 1 and types.count("SignalReceived") == 1
    assert work.count == Counter({"prepare": 1, "after": 1})


# --- 3. a store outage while a result is written -------------------------------------------

async def test_a_result_survives_a_store_outage_and_is_written_when_it_ends(
        store_url: str) -> None:
    store = faulty(store_url)
    seen_pending: list[int] = []
    calls = 0

    async def during_an_outage(task: Task) -> Any:
        nonlocal calls
        calls += 1
        store.outage(2.5)  # longer than the old code's retries lasted (about 1.8 s)
        return {"done": True}

    wf = Workflow("outage", on_failure=FAIL, steps=[
        Step("only", executor="flaky-store", next=END)])
    async with Engine(store, [wf], {"flaky-store": during_an_outage}) as engine:
        run_id = await engine.start("outage")

        async def watch_backlog() -> None:
            while True:
                seen_pending.append(engine.results_pending)
                await asyncio.sleep(0.05)

        watcher = asyncio.create_task(watch_backlog())
        view = await engine.wait(run_id, timeout=20)
        watcher.cancel()
    assert view.status == "completed"
    assert calls == 1  # the result was kept, not dropped and the step run again
    assert max(seen_pending) == 1 and engine.results_pending == 0


# --- 4. open() that fails, and one bad run among good ones ------------------------------------

async def test_a_failed_open_leaves_nothing_running_and_can_be_retried(
        durable_url: str) -> None:
    async with Engine(durable_url, [approval()], {"work": Calls()}) as engine:
        run_id = await engine.start("approval")
        await waiting_for_go(engine, run_id)
    store = faulty(durable_url)
    engine = Engine(store, [approval()], {"work": Calls()})
    store.fail_next(1, method="runs_to_recover")  # recovery cannot list the unfinished runs
    with pytest.raises(StoreUnavailable):
        await engine.open()
    with pytest.raises(EngineClosed):
        await engine.start("approval")
    await engine.open()  # all or nothing: a second open does the whole job
    try:
        await engine.signal(run_id, "go", {"approved": True})
        assert (await engine.wait(run_id, timeout=10)).status == "completed"
    finally:
        await engine.close()


async def test_a_run_that_cannot_be_recovered_is_quarantined_and_the_others_recover(
        durable_url: str) -> None:
    # Kept in memory (park_after=None), so that a restart recovers both runs at open.
    async with Engine(durable_url, [approval()], {"work": Calls()}, park_after=None) as engine:
        good = await engine.start("approval")
        await waiting_for_go(engine, good)
        bad = await engine.start("approval")
        await waiting_for_go(engine, bad)
    store = open_store(durable_url)
    events = len(store.read(bad))
    store.append([Record(bad, events + 1, "SignalReceived", b"{not json")])
    async with Engine(store, [approval()], {"work": Calls()}, park_after=None) as engine:
        assert set(engine.quarantined) == {bad}
        with pytest.raises(CorruptRun):
            await engine.get(bad)
        await engine.signal(good, "go", {"approved": True})
        assert (await engine.wait(good, timeout=10)).status == "completed"


# --- 6. signals ---------------------------------------------------------------------------

async def test_signals_are_checked_on_receipt_and_deduplicated_by_id(store_url: str) -> None:
    gate = asyncio.Event()

    async def slow(task: Task) -> Any:
        await gate.wait()
        return {}

    async with Engine(store_url, [approval()], {"work": slow}) as engine:
        run_id = await engine.start("approval")
        # Before the wait step is reached, the payload is still checked against its schema.
        with pytest.raises(InvalidInput, match="approved"):
            await engine.signal(run_id, "go", {"approved": "maybe not"})
        with pytest.raises(InvalidInput, match=r"no step waiting for signal 'og'.*'go'"):
            await engine.signal(run_id, "og", {"approved": True})
        await engine.signal(run_id, "go", {"approved": True}, id="a-1")  # buffered, valid
        await engine.signal(run_id, "go", {"approved": True}, id="a-1")  # a resend: nothing
        with pytest.raises(IdempotencyConflict, match="a-1"):
            await engine.signal(run_id, "stop", None, id="a-1")
        gate.set()
        view = await engine.wait(run_id, timeout=10)
        # After the end, a resend of a recorded signal still answers as the first did...
        await engine.signal(run_id, "go", {"approved": True}, id="a-1")
        with pytest.raises(RunTerminal):  # ... and a new one is refused
            await engine.signal(run_id, "go", {"approved": True}, id="a-2")
        signals = [e for e in await engine.events(run_id) if e.type == "SignalReceived"]
    assert view.status == "completed"
    assert view.steps["ok"].output == {"approved": True}
    assert len(signals) == 1


# --- 7. followers -----------------------------------------------------------------------------

async def test_a_follower_ends_when_the_engine_learns_the_end_by_reading_back(
        store_url: str) -> None:
    store = faulty(store_url)
    following = asyncio.Event()

    async def last_step(task: Task) -> Any:
        await following.wait()
        # The result's write lands, its acknowledgement is lost, and reading it back fails
        # once too: the engine cannot know the run ended until it reads the log again.
        store.lose_acks(1)
        store.fail_next(1, method="read")
        return {"done": True}

    wf = Workflow("learnt", on_failure=FAIL, steps=[Step("only", executor="last", next=END)])
    async with Engine(store, [wf], {"last": last_step}) as engine:
        run_id = await engine.start("learnt")
        followed: list[str] = []
        async with asyncio.timeout(10):  # must end, not hang
            async for event in engine.watch(run_id):
                followed.append(event.type)
                following.set()  # the follower is attached and has read the log
        view = await engine.wait(run_id, timeout=10)
        stored = [e.type for e in await engine.events(run_id)]
    assert followed[-1] == "RunCompleted" and followed.count("RunCompleted") == 1
    assert followed == stored
    assert view.status == "completed"


# --- 8. smaller ones --------------------------------------------------------------------------

async def test_an_idempotency_key_with_another_input_is_a_conflict(store_url: str) -> None:
    async with Engine(store_url, [approval()], {"work": Calls()}) as engine:
        run_id = await engine.start("approval", {"x": 1}, idempotency_key="k")
        assert await engine.start("approval", {"x": 1}, idempotency_key="k") == run_id
        with pytest.raises(IdempotencyConflict, match="'k'"):
            await engine.start("approval", {"x": 2}, idempotency_key="k")
        await engine.cancel(run_id)


async def test_register_refuses_a_workflow_whose_executor_is_missing(store_url: str) -> None:
    other = Workflow("other", on_failure=FAIL, steps=[Step("s", executor="nowhere")])
    async with Engine(store_url, [approval()], {"work": Calls()}) as engine:
        with pytest.raises(DefinitionError, match="'nowhere'"):
            engine.register(other)
        assert engine.registry.versions("other") == []


async def test_a_declared_secret_never_reaches_a_stored_failure_message(store_url: str) -> None:
    canary = "sk-canary-5f1e8b"

    class Leaky:
        def secret_values(self) -> list[str]:
            return [canary]

        async def __call__(self, task: Task) -> Any:
            raise PermanentError(f"upstream said: Authorization: Bearer {canary}")

    wf = Workflow("leaky", on_failure=FAIL, steps=[Step("s", executor="leaky", next=END)])
    async with Engine(store_url, [wf], {"leaky": Leaky()}) as engine:
        run_id = await engine.start("leaky")
        await engine.wait(run_id, timeout=10)
        stored = b"".join(r.data for r in await engine.storage.read(run_id))
        explained = await engine.explain(run_id)
    assert canary.encode() not in stored and canary not in explained
    assert b"Bearer ***" in stored
