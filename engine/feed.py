"""The feed: callers waiting for a run's end (`wait`) and following its events (`watch`).

Both are fed from what is stored: the events of a commit as it lands, and the events a
reload finds (written by an earlier write whose outcome was unknown, or by another engine),
so a follower sees every event once, in order, and ends with the run whichever way the
engine learnt of the end.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from uuid import UUID

from rulebound.domain import events as ev
from rulebound.domain.state import RunState

from .live import LiveRun

ENGINE_CLOSED = -1  # the position a follower is handed when the engine stops
RUN_RETIRED = -2  # ... when the run is quarantined (its log can no longer be folded)

# Told of every commit: the run, its state after the commit, and the events committed.
Listener = Callable[[UUID, RunState, Sequence[ev.Event]], None]


class Feed:
    def __init__(self) -> None:
        self.listeners: list[Listener] = []  # observers in-process (tracing, tests)

    def committed(self, run: LiveRun, events: Sequence[ev.Event]) -> None:
        for listener in self.listeners:
            listener(run.run_id, run.state, events)

    def publish(self, run: LiveRun, first_seq: int, events: Sequence[ev.Event]) -> None:
        """Events `first_seq`, `first_seq + 1`, ... of `run` are stored: tell its followers."""
        for queue in run.watchers:
            for n, event in enumerate(events):
                queue.put_nowait((first_seq + n, event))

    def close(self, run: LiveRun) -> None:
        """The engine stops: followers stop too (they may follow again elsewhere), and
        waiters wake to see the run as it is."""
        for queue in run.watchers:
            queue.put_nowait((ENGINE_CLOSED, None))  # type: ignore[arg-type]
        self.end(run)

    def retire(self, run: LiveRun) -> None:
        """The run is quarantined: followers stop with that news, waiters wake to it."""
        for queue in run.watchers:
            queue.put_nowait((RUN_RETIRED, None))  # type: ignore[arg-type]
        self.end(run)

    def end(self, run: LiveRun) -> None:
        """The run ended (or is no longer driven here): wake everyone waiting for it."""
        for waiter in run.waiters:
            if not waiter.done():
                waiter.set_result(None)
        run.waiters.clear()

    def hand_over(self, old: LiveRun, new: LiveRun | None) -> None:
        """Waiters on an object that no longer stands for its run move to the one that does
        (or wake to find out: RunNotFound or its end)."""
        waiters = [w for w in old.waiters if not w.done()]
        old.waiters.clear()
        if new is not None and not new.state.terminal and not new.held:
            new.waiters.extend(waiters)
            return
        for waiter in waiters:
            waiter.set_result(None)

    async def wait(self, run: LiveRun, timeout: float | None) -> None:  # noqa: ASYNC109
        """Until `run` ends; raises TimeoutError after `timeout` seconds."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        run.waiters.append(waiter)
        try:
            # No shield: the waiter is this call's own future (nobody else awaits it, and
            # `end` skips done ones), so cancelling it with the caller is harmless. Not
            # wait_for: on Python 3.11 it swallows the caller's cancellation when the run
            # ends in the same iteration, and a cancelled request would then never end.
            async with asyncio.timeout(timeout):
                await waiter
        finally:
            if waiter in run.waiters:
                run.waiters.remove(waiter)
