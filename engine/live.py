"""A run this engine is driving: its folded state, its lock, and what waits on it.

One object per live run, owned by the engine's run table. Everything that changes a run
happens under `lock`; `dirty` says the stored log may be ahead of `state` (a write whose
outcome is unknown, another writer), so the next holder of the lock must reload first.
"""

from __future__ import annotations

import asyncio
import time
from datetime import datetime
from uuid import UUID

from rulebound.domain import events as ev
from rulebound.domain.definitions import Workflow
from rulebound.domain.state import RunState


class LiveRun:
    __slots__ = ("admit_at", "attempts", "deadline_at", "definition", "dirty", "held",
                 "id_text", "last_hash", "lock", "reconcile", "run_id", "state", "timer",
                 "timer_at", "used_at", "waiters", "watchers")

    def __init__(self, run_id: UUID, definition: Workflow | None, state: RunState,
                 last_hash: str) -> None:
        self.run_id = run_id
        self.id_text = str(run_id)  # for idempotency keys: UUID.__str__ costs ~1.5 us a call
        self.definition = definition
        self.state = state
        self.last_hash = last_hash
        self.lock = asyncio.Lock()
        # step key -> the asyncio task running that step's current attempt here
        self.attempts: dict[str, asyncio.Task[None]] = {}
        self.waiters: list[asyncio.Future[None]] = []
        self.watchers: list[asyncio.Queue[tuple[int, ev.Event]]] = []
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at: datetime | None = None
        self.held: str | None = None
        self.dirty = False
        # The log may show attempts as running that nothing here runs (a restart, a write
        # whose outcome was unknown): the next commit abandons them and decides again.
        self.reconcile = False
        self.deadline_at: datetime | None = None
        self.admit_at: datetime | None = None  # when a rate limit may next admit an attempt
        # When a request, a waiter or a follower here last asked for it (monotonic): a copy
        # of another engine's run is let go once unused for a while, never in the middle.
        self.used_at = time.monotonic()

    def orphaned_attempts(self, now: datetime) -> list[ev.Event]:
        """AttemptAbandoned for every attempt the log shows running with no task here."""
        return [
            ev.AttemptAbandoned(at=now, step=st.key, attempt=st.attempt,
                                why="no engine is running this attempt (restart or lost write)")
            for st in self.state.steps.values()
            if st.status == "running" and st.kind == "task" and st.key not in self.attempts
        ]
