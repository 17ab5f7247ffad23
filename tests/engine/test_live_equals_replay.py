"""DESIGN's first consequence, on the real engine: replaying a run's stored log gives the
state the live engine held, at every commit it made (not only at the end).

The engine keeps its live state by folding the events it builds in memory (some without
validation, for speed); the replay folds what the store gives back, decoded and validated.
The demo workflow exercises retries, failure paths, parallel branches and approval signals
(and, depending on its seeded retries, a budget limit).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from rulebound.adapters.demo.run import approver, demo_registry, load_tickets
from rulebound.adapters.demo.workflow import triage
from rulebound.domain.state import RunState, evolve
from rulebound.engine import Engine
from rulebound.engine.testing import canonical_state


class RecordingEngine(Engine):
    """An engine that keeps a canonical snapshot of each run's live state after each commit."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.snapshots: dict[UUID, list[tuple[int, bytes]]] = {}
        self.feed.listeners.append(self._snapshot)

    def _snapshot(self, run_id: UUID, state: RunState, events: Any) -> None:
        self.snapshots.setdefault(run_id, []).append((state.version, canonical_state(state)))


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
async def test_replay_equals_the_live_state_at_every_commit(kind: str, tmp_path: Path) -> None:
    store = "memory://" if kind == "memory" else f"sqlite:///{tmp_path / 'live.db'}"
    tickets = load_tickets()
    async with RecordingEngine(store, registry=demo_registry(), max_concurrency=16) as engine:
        run_ids = [await engine.start(triage.name, t) for t in tickets]
        stop = asyncio.Event()
        human = asyncio.create_task(approver(engine, run_ids, stop))
        views = [await engine.wait(r, timeout=60) for r in run_ids]
        stop.set()
        await human
        logs = {r: await engine.events(r) for r in run_ids}
    assert {v.status for v in views} <= {"completed", "failed"}
    seen_types = {e.type for events in logs.values() for e in events}
    assert {"SignalReceived", "AttemptFailed", "TransitionTaken"} <= seen_types  # rich enough
    assert any(e.type == "StepScheduled" and e.attempt > 1  # type: ignore[attr-defined]
               for events in logs.values() for e in events)  # retries happened
    commits = 0
    for run_id in run_ids:
        events = logs[run_id]
        prefixes: dict[int, bytes] = {}
        state = RunState()
        for event in events:
            state = evolve(state, event)
            prefixes[state.version] = canonical_state(state)
        snapshots = engine.snapshots[run_id]
        assert snapshots[-1][0] == len(events)  # the last commit is the end of the log
        for version, live in snapshots:
            assert prefixes[version] == live, f"run {run_id}: replay differs at event {version}"
        commits += len(snapshots)
    assert commits > 5 * len(run_ids)  # many commits per run were compared, not just the end
