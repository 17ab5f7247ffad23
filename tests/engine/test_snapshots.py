"""Snapshots are derived data: a state survives to_dict -> JSON -> from_dict unchanged, and a
load that starts from a snapshot gives exactly the fold from the first event, whatever the
snapshot's place, and whatever is wrong with it (then it is ignored and written anew)."""

from __future__ import annotations

import asyncio
from typing import Any
from uuid import UUID, uuid4

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rulebound.adapters.stores import open_store
from rulebound.domain.simulator import Simulator
from rulebound.domain.state import RunState, replay
from rulebound.engine import codec, snapshots
from rulebound.engine.registry import Registry
from rulebound.engine.runs import RunTable
from rulebound.engine.storage import StoreWorker
from rulebound.engine.store import Record, Snapshot

from rulebound import FAIL, Limits, Route, Step, Workflow, field
from tests.domain.test_stateful import OUTPUTS, workflows

ACTIONS = st.lists(st.tuples(st.sampled_from(["go", "go", "go", "fail", "signal", "wait",
                                              "crash", "cancel"]),
                             st.integers(0, 7), OUTPUTS), min_size=1, max_size=60)


def _history(definition: Any, seed: int, actions: list[tuple[str, int, Any]]) -> list[Any]:
    """A run of `definition` driven through the real decider by the drawn actions."""
    sim = Simulator(definition, seed=seed)
    sim.start({"items": [1, 2, 3]})
    for action, pick, output in actions:
        if sim.state.terminal:
            break
        for key in sim.ready():
            sim.start_attempt(key)
        running = sim.running()
        if action == "go" and running:
            sim.succeed(running[pick % len(running)], output)
        elif action == "fail" and running:
            sim.fail(running[pick % len(running)], "server_error")
        elif action == "signal":
            sim.signal(["approve", "more"][pick % 2], {"ok": pick % 3 == 0})
        elif action == "crash":
            sim.crash()
        elif action == "cancel" and pick == 0:
            sim.cancel("test")
        else:
            sim.advance_time(float(pick) * 3)
    return sim.history


def _records(run_id: UUID, events: list[Any]) -> list[Record]:
    """The events as the engine stores them (stamped, chained)."""
    records, prev = [], codec.GENESIS_HASH
    for seq, event in enumerate(events, start=1):
        prev, data = codec.stamp(event, uuid4(), prev)
        records.append(Record(run_id, seq, event.type, data))
    return records


def _decoded_states(records: list[Record]) -> list[RunState]:
    """Every prefix's state, folded from the stored (decoded) events."""
    states, state = [], RunState()
    for record in records:
        state = replay([codec.decode(record.data)], state)
        states.append(state)
    return states


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(definition=workflows(), seed=st.integers(0, 2**31), actions=ACTIONS)
def test_from_dict_inverts_to_dict_for_every_folded_state(definition: Any, seed: int,
                                                          actions: Any) -> None:
    records = _records(uuid4(), _history(definition, seed, actions))
    for state in _decoded_states(records):
        plain = state.to_dict()
        assert RunState.from_dict(plain) == state
        back = RunState.from_dict(orjson.loads(orjson.dumps(plain)))
        assert back == state
        assert orjson.dumps(back.to_dict(), option=orjson.OPT_SORT_KEYS) == orjson.dumps(
            plain, option=orjson.OPT_SORT_KEYS)


async def _load(store: Any, run_id: UUID, every: int) -> RunState:
    worker = StoreWorker(store)
    worker.start()
    try:
        table = RunTable(Registry(), keep_finished=10)
        table.snapshot_every = every
        state, _hash, _events = await table.load(worker, run_id)
        return state
    finally:
        await worker.close(close_store=False)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(definition=workflows(), seed=st.integers(0, 2**31), actions=ACTIONS,
       at=st.floats(0, 1), damage=st.sampled_from(["none", "hash", "fold", "bytes", "beyond"]))
def test_a_load_from_any_snapshot_equals_the_fold_from_scratch(
        definition: Any, seed: int, actions: Any, at: float, damage: str) -> None:
    run_id = uuid4()
    records = _records(run_id, _history(definition, seed, actions))
    states = _decoded_states(records)
    k = max(1, round(at * len(records)))  # the snapshot's version
    made = snapshots.encode(run_id, k, orjson.loads(records[k - 1].data)["hash"], states[k - 1])
    assert made is not None
    data = orjson.loads(made.data)
    if damage == "hash":  # a snapshot of another history: must not be used
        data["hash"] = "f" * 64
    elif damage == "fold":  # written by another version of the fold
        data["fold"] = "0" * 16
    elif damage == "bytes":
        data["state"] = {"not": "a state"}
    inner = open_store("memory://")
    inner.append(records)
    version = len(records) + 5 if damage == "beyond" else k
    # A snapshot beyond the log is refused by a real store: a store of the port's shape hands
    # out the planted one until a new snapshot is written.
    store = _Planted(inner, Snapshot(run_id, version, orjson.dumps(data)))
    loaded = asyncio.run(_load(store, run_id, every=3))
    assert loaded == states[-1]
    newest = store.read_snapshot(run_id)
    if damage != "none" or len(records) - k >= 3:
        # rebuilt (or moved on) when the load folded 3 events or more past a usable snapshot
        folded = len(records) if damage != "none" else len(records) - k
        if folded >= 3:
            assert newest is not None and newest.version == len(records)
            assert snapshots.decode(newest.data) == (states[-1],
                                                     orjson.loads(records[-1].data)["hash"])


def test_a_long_run_loads_from_its_snapshot(sqlite_url: str) -> None:
    """On SQLite: the first load of a long run writes a snapshot, the next starts from it."""
    loop = Workflow("loop", on_failure=FAIL, limits=Limits(max_steps=10_000, max_cost=1e9,
                                                     deadline=1e9), steps=[
        Step("work", executor="x", max_visits=5_000,
             routes=[Route("work", when=field("work.again").is_true())])])
    sim = Simulator(loop)
    sim.start({})
    for i in range(300):
        sim.start_attempt("work")
        sim.succeed("work", {"again": i < 299})
        sim.advance_time(0.001)
    run_id = uuid4()
    records = _records(run_id, sim.history)
    store = open_store(sqlite_url)
    try:
        store.append(records)
        expected = _decoded_states(records)[-1]
        assert asyncio.run(_load(store, run_id, every=200)) == expected
        snap = store.read_snapshot(run_id)
        assert snap is not None and snap.version == len(records)
        assert asyncio.run(_load(store, run_id, every=200)) == expected
    finally:
        store.close()


class _Planted:
    """A store (the port's shape, over a real one) whose snapshot of a run is `planted`
    until a snapshot is written: a damaged or impossible snapshot, as a load would meet it."""

    def __init__(self, inner: Any, planted: Snapshot) -> None:
        self.inner, self.planted = inner, planted

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def read_snapshot(self, run_id: Any) -> Snapshot | None:
        if self.planted is not None and run_id == self.planted.run_id:
            return self.planted
        return self.inner.read_snapshot(run_id)

    def write_snapshot(self, snapshot: Snapshot) -> None:
        self.planted = None  # type: ignore[assignment]
        self.inner.write_snapshot(snapshot)
