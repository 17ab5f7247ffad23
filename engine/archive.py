"""Retention: move ended runs out of the store into verified export files.

`archive(store, directory, ended_before=...)` writes each ended run's export (the JSON
lines of `rulebound export`, closed by the manifest with its head hash) to
`directory/<run id>.jsonl`, and removes the run from the store only once that file is
written, fsynced (the file, then the directory entry), read back byte for byte and verified:
complete per its manifest, anchored to the head hash the store holds, the chain intact, the
fold clean, the run ended, and its decisions re-derived (or unchecked, when the run's
workflow version is not in the registry given: that is about the definition, not the file).

Nothing is removed on a doubt: a run whose log changed since it was exported (a different
event count) is left in the store by `delete_runs` itself, and a run whose export does not
verify is kept and reported. Interrupted at any point, a second pass finishes the work:
files already written and identical are not written again, only read back and verified;
runs already removed are no longer listed. Leftover `*.jsonl.tmp` files (a write cut off)
are removed. Synchronous: call it from a thread.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from uuid import UUID

import orjson
from rulebound.domain.errors import RuleboundError
from rulebound.domain.events import TERMINAL_EVENTS

from .audit import EXIT_FAILED, export_records, export_text, verify_lines
from .store import EventStore, Record

SUFFIX = ".jsonl"


class ArchiveError(RuleboundError):
    """The archive could not be done at all (a directory that cannot be written, a store
    that cannot remove runs)."""


@dataclass
class ArchiveResult:
    archived: int = 0  # removed from the store, their verified file in the directory
    events: int = 0  # events of the archived runs
    reused: int = 0  # of those, files found already written (an earlier, cut-off pass)
    listed: int = 0  # ended runs looked at
    kept: list[tuple[UUID, str]] = field(default_factory=list)  # not removed, and why
    failed: int = 0  # of the kept, those whose export did not verify
    seconds: float = 0.0

    @property
    def rate(self) -> float:
        return self.archived / self.seconds if self.seconds > 0 else 0.0


Progress = Callable[[ArchiveResult], None]


def archive(store: EventStore, directory: str | os.PathLike[str], *, ended_before: datetime,
            workflow: str | None = None, definition_for: Any = None,
            progress: Progress | None = None, batch: int = 200, page: int = 1000,
            after_secured: Callable[[int], None] | None = None) -> ArchiveResult:
    """Archive every run of `workflow` (or all) that ended before `ended_before`.

    `definition_for(hash, name)` finds definitions to re-derive decisions (None: unchecked).
    `progress(result)` is called after each run. `after_secured(n)` is called with the count
    of files secured so far, before their runs are removed (tests use it to cut a pass off in
    its most delicate moment). Reads the read model as it is: bring it up to date first.
    """
    if not hasattr(store, "delete_runs"):
        raise ArchiveError(f"this store ({type(store).__name__}) cannot remove runs")
    folder = Path(directory)
    try:
        folder.mkdir(exist_ok=True)
        for leftover in folder.glob(f"*{SUFFIX}.tmp"):
            leftover.unlink()
    except OSError as exc:
        raise ArchiveError(f"cannot use {str(folder)!r} as the archive: "
                           f"{exc.strerror or exc}") from None
    finder = definition_for or (lambda _hash, _name: None)
    result = ArchiveResult()
    began = time.monotonic()
    pending: dict[UUID, int] = {}
    offset = 0  # rows listed and kept in the store: the next page starts after them
    secured = 0
    while True:
        rows = store.list_runs(workflow=workflow, limit=page, offset=offset)
        if not rows:
            break
        for row in rows:
            if row.status == "running" or row.updated_at >= ended_before:
                offset += 1  # not for this pass
                continue
            result.listed += 1
            count, why = _secure(store, folder, row.run_id, ended_before, finder, result)
            if why is not None:
                offset += 1
                result.kept.append((row.run_id, why))
            else:
                pending[row.run_id] = count
                secured += 1
                if after_secured is not None:
                    after_secured(secured)
            if len(pending) >= batch:
                offset += _remove(store, folder, pending, result)
            if progress is not None:
                progress(result)
        if pending:
            offset += _remove(store, folder, pending, result)
    result.seconds = time.monotonic() - began
    if progress is not None:
        progress(result)
    return result


def _secure(store: EventStore, folder: Path, run_id: UUID, ended_before: datetime,
            finder: Any, result: ArchiveResult) -> tuple[int, str | None]:
    """Write (or find) the run's export and verify what the file holds. Returns the run's
    event count and None when it may be removed, else why not."""
    records = store.read(run_id, 0)
    if not records:
        return 0, "no longer in the store"
    ended = _ended_at(records[-1])
    if ended is None:
        return 0, "still going"  # the read model said ended; the log has the last word
    if ended >= ended_before:
        return 0, "ended after the cut-off"
    lines = export_records(str(run_id), records)
    head = lines[-1]["manifest"]["head_hash"]
    data = export_text(lines).encode("utf-8")
    path = folder / f"{run_id}{SUFFIX}"
    try:
        existing = path.read_bytes() if path.exists() else None
        if existing == data:
            result.reused += 1
        else:
            _write_durably(path, data)
        back = path.read_bytes()
    except OSError as exc:
        raise ArchiveError(f"cannot write {str(path)!r}: {exc.strerror or exc}") from None
    if back != data:
        return 0, f"{path.name} does not read back as written"
    try:
        parsed = [json.loads(line) for line in back.decode("utf-8").splitlines() if line]
    except ValueError as exc:
        return 0, f"{path.name} does not parse back: {exc}"
    report = verify_lines(parsed, finder, require_manifest=True, head=head)
    if (report.exit_code == EXIT_FAILED or not report.complete or not report.anchored
            or not report.terminal):
        result.failed += 1
        with contextlib.suppress(OSError):
            path.unlink()  # the directory holds archived runs only; this one stays stored
        first = report.first
        return 0, (f"its export does not verify ({first})" if first
                   else "its export is incomplete")
    return len(records), None


def _ended_at(last: Record) -> datetime | None:
    """When the run ended, if its last event ends it."""
    if last.topic not in TERMINAL_EVENTS:
        return None
    try:
        return datetime.fromisoformat(orjson.loads(last.data)["event"]["at"])
    except (ValueError, KeyError, TypeError):
        return None  # unreadable: not for removal (verification would name the problem)


def _write_durably(path: Path, data: bytes) -> None:
    """Write to a temporary name, fsync, then rename over `path` (a reader never sees half
    a file); the directory is fsynced before any run is removed (`_remove`)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with tmp.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(store: EventStore, folder: Path, pending: dict[UUID, int],
            result: ArchiveResult) -> int:
    """Make the files' directory entries durable, then remove their runs from the store;
    returns how many stayed (their log changed after the export). A run another pass
    removed meanwhile is archived all the same: its verified file is here."""
    try:
        _fsync_dir(folder)
    except OSError as exc:
        raise ArchiveError(f"cannot sync {str(folder)!r}: {exc.strerror or exc}") from None
    removed = set(store.delete_runs(pending))
    stayed = 0
    for run_id, count in pending.items():
        if run_id in removed or not store.read(run_id, count - 1):  # or by another pass
            result.archived += 1
            result.events += count
        else:
            stayed += 1
            result.kept.append((run_id, "its log changed after the export; not removed"))
    pending.clear()
    return stayed
