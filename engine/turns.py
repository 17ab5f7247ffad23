"""Turns: the engine's work takes turns with the rest of the event loop.

asyncio runs every callback that is ready at the start of an iteration before it looks at
timers and sockets again. When 200 runs' results arrive together, committing all of them in
one iteration stalls everything else on the loop (an embedding service's HTTP handlers, its
timers) for 20 ms or more. So commits stop going straight through once `turn` seconds have
passed since the iteration's first; later ones queue in order and are let through about a
turn's worth per iteration (as many as the last turn's own commits say fit). A quiet loop
never waits: the first commit of an iteration goes.

A commit is one unit of work here, and so is an attempt's result: it takes its turn as soon
as its executor returns, before its output is checked and its event built, and then commits
in that same turn (Engine._attempt). 10,000 executors whose sleeps end together used to do
all of that in one iteration, since only the commit at its end waited.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable


class Turns:
    """The commit gate. `clock` is injectable so tests can drive the turn without timing."""

    def __init__(self, *, turn: float = 0.002,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.turn = turn
        self.clock = clock
        self.fit = 16  # queued commits let through per turn, measured on every turn
        self._armed = False  # an end() is scheduled for the next loop iteration
        self._began: float | None = None  # when this turn's first commit began
        self._last = 0.0  # when its latest commit began
        self._commits = 0
        self._queue: deque[asyncio.Future[None]] = deque()

    @property
    def queued(self) -> int:
        """Commits waiting for a later turn."""
        return len(self._queue)

    def gate(self) -> asyncio.Future[None] | None:
        """None to commit now, or a future to await first (then call `admitted`)."""
        if not self._armed:  # the first commit of this loop iteration
            self._armed = True
            asyncio.get_running_loop().call_soon(self.end)
        if self._queue:  # others wait already: queue behind them
            return self._defer()
        now = self.clock()
        if self._began is not None and now - self._began > self.turn:
            return self._defer()
        self._count(now)
        return None

    def admitted(self) -> None:
        """A commit that waited in the queue begins now."""
        self._count(self.clock())

    def _defer(self) -> asyncio.Future[None]:
        waiter = asyncio.get_running_loop().create_future()
        self._queue.append(waiter)
        return waiter

    def _count(self, now: float) -> None:
        if self._began is None:
            self._began = now
        self._last = now
        self._commits += 1

    def end(self) -> None:
        """At the next loop iteration (timers and I/O have had their turn): let the next
        queued commits through, as many as fit in a turn, and keep turning while any wait."""
        began, commits = self._began, self._commits
        if began is not None and commits > 1 and self._last > began:
            # Measured from this turn's own commits: the ones let through run back to back.
            per_commit = (self._last - began) / (commits - 1)
            self.fit = max(1, min(1024, 1 + int(self.turn / per_commit)))
        elif self._queue and commits == 1:
            self.fit = min(1024, self.fit * 2)  # nothing to measure: probe upwards
        self._armed = False
        self._began = None
        self._commits = 0
        released = 0
        queue = self._queue
        while queue and released < self.fit:
            waiter = queue.popleft()
            if not waiter.done():  # skip a caller that was cancelled meanwhile
                waiter.set_result(None)
                released += 1
        if queue:  # the ones let through run in the next iteration: turn again after it
            self._armed = True
            asyncio.get_running_loop().call_soon(self.end)
