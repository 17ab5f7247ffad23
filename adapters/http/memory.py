"""Give freed memory back to the system once `rulebound serve` has been quiet for a while.

After a burst of runs their objects are freed, but the process keeps the memory: glibc's
malloc keeps freed chunks in its heap, and CPython keeps an arena while any object in it
lives. `malloc_trim(0)` hands glibc's free pages back (benchmarks/README.md, "Sustained load
over HTTP", has the figures; the engine keeps ended runs' states pickled, in glibc's heap,
so that they do not hold CPython's arenas). It is done here, in the server whose
process this is, and not in the embeddable Engine: a library must not trim its host's heap
behind its back. `give_back()` is the same step for a host that wants it, called when it
chooses.

Quiet means: no run in flight, no attempt running, nothing committed, no request to the
run API and no ended run's state let go from the engine's cache (`keep_finished_for`: the
states of a burst go up to 30 s after it, and they are most of what a trim can return) for
`after` seconds. Then one `gc.collect()` (on the loop: finalizers run where the
objects lived) and one `malloc_trim(0)` (in a thread: it can take milliseconds), once per
quiet period, not again until something has happened. Where malloc_trim does not exist
(musl, macOS, Windows) only the collection is done.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import cache
from typing import Any

from aiohttp import web
from rulebound.engine import Engine

log = logging.getLogger("rulebound.http")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# Looks up the trim to call: glibc's malloc_trim(0) by default (malloc_trim below), None
# where the C library has none. A parameter so that a caller (a test) can be a platform
# without one, or count the trims.
FindTrim = Callable[[], Callable[[], int] | None]


@cache
def malloc_trim() -> Callable[[], int] | None:
    """glibc's `malloc_trim(0)`, or None where the C library has none."""
    try:
        libc = ctypes.CDLL(None)  # the symbols the process already has: its C library's
        trim = libc.malloc_trim
    except (OSError, AttributeError, TypeError):  # no such symbol (musl, macOS), no dlopen
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return lambda: int(trim(0))


def give_back(find_trim: FindTrim = malloc_trim) -> bool:
    """Collect cyclic garbage, then ask glibc to return its free pages to the system.

    Opt-in, for a process that is yours (`rulebound serve` does it when quiet). It blocks
    for the collection and the trim (measured at 76 MiB of RSS: 20-45 ms and under 2 ms).
    True if malloc_trim was called."""
    gc.collect()
    trim = find_trim()
    if trim is None:
        return False
    trim()
    return True


class GiveBack:
    """Watches an engine and its HTTP API; gives memory back once per quiet period."""

    def __init__(self, engine: Engine, after: float,
                 clock: Callable[[], float] = time.monotonic,
                 find_trim: FindTrim = malloc_trim) -> None:
        if not after > 0:
            raise ValueError(f"after must be positive seconds, got {after!r}")
        self.engine, self.after, self._clock, self._find_trim = engine, after, clock, find_trim
        self.passes = 0  # give-backs done (the /metrics counter)
        self.requests = 0  # requests to the run API seen
        self._seen: tuple[int, int, int] | None = None
        self._busy_at = clock()
        self._armed = True  # start-up (recovery) is activity too

    def _busy(self) -> bool:
        """Whether something happened since the last look (and note it)."""
        engine = self.engine
        seen = (engine.metrics.commits, self.requests, engine.ended_states_kept)
        changed, self._seen = seen != self._seen, seen
        return changed or engine.active_runs > 0 or engine.attempts_in_flight > 0

    def due(self) -> bool:
        """Whether to give back now: quiet for `after` seconds, not yet done since."""
        now = self._clock()
        if self._busy():
            self._busy_at, self._armed = now, True
            return False
        return self._armed and now - self._busy_at >= self.after

    async def once(self) -> None:
        """One give-back: the collection on the loop, the trim in a thread."""
        self._armed = False
        began = time.perf_counter()
        gc.collect()
        trim = self._find_trim()
        if trim is not None:
            await asyncio.to_thread(trim)
        self.passes += 1
        log.debug("gave memory back after %g s of quiet in %.1f ms (malloc_trim %s)",
                  self.after, (time.perf_counter() - began) * 1e3,
                  "called" if trim is not None else "not available")

    async def watch(self) -> None:
        """Look a few times per `after` seconds, forever (cancel it to stop)."""
        tick = min(1.0, self.after / 4)
        while True:
            await asyncio.sleep(tick)
            if self.due():
                await self.once()

    def middleware(self) -> Any:
        """Counts requests to the run API (/v1): a client reading runs is activity; health
        checks and /metrics scrapes are not, so that they do not keep the server busy."""

        @web.middleware
        async def seen(request: web.Request, handler: Handler) -> web.StreamResponse:
            if request.path.startswith("/v1"):
                self.requests += 1
            return await handler(request)

        return seen

    async def running(self, app: web.Application) -> AsyncIterator[None]:
        """For app.cleanup_ctx: watch while the app runs."""
        task = asyncio.create_task(self.watch())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    def metric_lines(self) -> list[str]:
        return [
            "# HELP rulebound_memory_give_backs_total Times the server gave freed memory back "
            "to the system after a quiet period (serve --give-back-after).",
            "# TYPE rulebound_memory_give_backs_total counter",
            f"rulebound_memory_give_backs_total {self.passes}",
        ]
