"""Retention on a schedule: `Engine(retention=Retention(...))` archives ended runs as it runs.

Each pass is `rulebound archive` (engine.archive): every run that ended more than
`keep_for` ago is written to `directory/<run id>.jsonl`, read back and verified, and only
then removed from the store. Going runs and recently ended ones are not touched. A pass runs
on a thread of its own (never on the loop, never on the store's reader threads, which serve
requests meanwhile); a failed pass is logged and tried again `every` later; closing the
engine stops a pass between two runs and waits for it (files already written are found and
reused by the next pass, so nothing is written twice or removed unverified).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from rulebound.domain.errors import RuleboundError

from .archive import ArchiveResult, archive
from .clock import Clock
from .registry import Registry
from .storage import StoreWorker

log = logging.getLogger("rulebound.retention")
_PROGRESS_EVERY = 10.0  # seconds between progress lines of a long pass


class InvalidRetention(RuleboundError, ValueError):
    """A Retention setting that cannot work (a negative age, a zero interval, no folder)."""


@dataclass(frozen=True, slots=True, init=False)
class Retention:
    """Move ended runs out of the store into verified export files, on a schedule.

    keep_for: how long an ended run stays in the store after it ended (zero or more).
    directory: where the exports go, one `<run id>.jsonl` per run (created if missing; the
      same files `rulebound archive -o DIR` writes, checked by `rulebound verify`).
    every: the time from the end of one pass to the start of the next (the first pass
      starts when the engine has opened).
    workflow: only runs of this workflow (None: every workflow).
    """

    keep_for: timedelta
    directory: Path
    every: timedelta = timedelta(hours=1)
    workflow: str | None = None

    def __init__(self, keep_for: timedelta, directory: str | os.PathLike[str], *,
                 every: timedelta = timedelta(hours=1), workflow: str | None = None) -> None:
        for name, value in (("keep_for", keep_for), ("every", every)):
            if not isinstance(value, timedelta):
                raise InvalidRetention(f"Retention.{name} must be a timedelta, got "
                                       f"{type(value).__name__}")
        if keep_for < timedelta(0):
            raise InvalidRetention(f"Retention.keep_for must not be negative, got {keep_for}")
        if every <= timedelta(0):
            raise InvalidRetention(f"Retention.every must be positive, got {every}")
        if not isinstance(directory, (str, os.PathLike)) or not str(directory):
            raise InvalidRetention("Retention.directory must name a folder")
        if workflow is not None and (not isinstance(workflow, str) or not workflow):
            raise InvalidRetention("Retention.workflow must be a workflow name or None")
        object.__setattr__(self, "keep_for", keep_for)
        object.__setattr__(self, "directory", Path(directory))
        object.__setattr__(self, "every", every)
        object.__setattr__(self, "workflow", workflow)


class _Stopped(Exception):
    """Raised inside a pass (from its progress callback) when the engine closes."""


class Retainer:
    """The engine's part that runs `Retention` passes until it is cancelled (at close)."""

    def __init__(self, retention: Retention, storage: StoreWorker, registry: Registry,
                 clock: Clock) -> None:
        self.retention = retention
        self.storage = storage
        self.registry = registry
        self.clock = clock
        self.passes = 0  # passes finished (with or without runs to archive)
        self.archived = 0  # runs moved out of the store by this engine

    async def run(self) -> None:
        """Pass, sleep `every`, pass again; a failed pass is logged and retried next time."""
        every = self.retention.every.total_seconds()
        while True:
            try:
                await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a store outage, a full disk: the next pass retries
                log.warning("retention: the pass failed (%s: %s); next try in %s",
                            type(exc).__name__, exc, self.retention.every)
            await asyncio.sleep(every)

    async def run_once(self) -> ArchiveResult:
        """One pass: bring the read model up to date, then archive on a thread of its own.
        Cancelled, it stops the pass between two runs and waits for the thread to return."""
        try:
            cut_off = self.clock.now() - self.retention.keep_for
        except OverflowError:  # before the year 1: nothing ended that long ago
            self.passes += 1
            return ArchiveResult()
        await self.storage.project()
        stop = threading.Event()
        shown = [time.monotonic()]

        def progress(result: ArchiveResult) -> None:
            if stop.is_set():
                raise _Stopped
            if time.monotonic() - shown[0] >= _PROGRESS_EVERY:
                shown[0] = time.monotonic()
                log.info("retention: %d runs archived so far, %d kept, %d looked at",
                         result.archived, len(result.kept), result.listed)

        work = functools.partial(
            archive, self.storage.store, self.retention.directory, ended_before=cut_off,
            workflow=self.retention.workflow, definition_for=self._definition,
            progress=progress)
        if self.storage.blocking:
            future: asyncio.Future[ArchiveResult] = asyncio.ensure_future(
                asyncio.to_thread(work))
        else:  # an in-memory store is called on the loop, as the engine calls it
            future = asyncio.get_running_loop().create_future()
            future.set_result(work())
        try:
            result = await asyncio.shield(future)
        except asyncio.CancelledError:
            stop.set()
            with contextlib.suppress(BaseException):  # cut off: the next pass resumes it
                await asyncio.shield(future)  # the thread finishes its run, then stops
            raise
        self.passes += 1
        self.archived += result.archived
        if result.archived or result.kept:
            log.info("retention: archived %d runs (%d events) that ended before %s to %s "
                     "in %.1f s; %d kept", result.archived, result.events,
                     cut_off.isoformat(), self.retention.directory, result.seconds,
                     len(result.kept))
        for run_id, why in result.kept[:20]:
            log.warning("retention: kept run %s: %s", run_id, why)
        return result

    def _definition(self, definition_hash: str, name: str) -> Any:
        """The definition a run's decisions are re-derived with (as `rulebound archive`)."""
        found = self.registry.by_hash(definition_hash)
        if found is None and name in self.registry.names():
            found = self.registry.latest(name)
        return found
