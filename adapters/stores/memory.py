"""In-memory store (`memory://`): the library's POPO recorder, for tests and quick runs."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Sequence
from typing import Any
from uuid import UUID

from eventsourcing.persistence import IntegrityError, StoredEvent
from eventsourcing.popo import POPOApplicationRecorder

from engine.store import ConcurrencyConflict, Record, RunChange, RunRow

from .base import RecorderStore


class LeanPOPORecorder(POPOApplicationRecorder):
    """The library's POPO recorder with the same tables and guarantees, written for speed.

    The base class converts every event's UUID to text twice per insert (about 1.5 us each)
    and builds a set of all new keys; an in-memory append is on the engine's hot path (one
    per step), so this variant converts each stream id once per insert. The library's own
    recorder test cases run against this class (tests/stores/test_library_recorder_cases).
    """

    def _assert_uniqueness(self, stored_events: Sequence[StoredEvent], **_: Any) -> None:
        index = self._stored_events_index
        names: list[str] = []
        seen: set[tuple[str, int]] = set()
        last: Any = None
        name = ""
        positions: dict[int, int] | None = None
        for s in stored_events:
            if s.originator_id is not last:  # an append is mostly one run: convert it once
                last = s.originator_id
                name = str(last)
                positions = index.get(name)
            key = (name, s.originator_version)
            if (positions is not None and s.originator_version in positions) or key in seen:
                raise IntegrityError(f"Stored event already recorded: {s}")
            seen.add(key)
            names.append(name)
        self._names = names  # read by _update_table, under the same database lock

    def _update_table(self, stored_events: Sequence[StoredEvent], **_: Any) -> list[int]:
        table = self._stored_events
        index = self._stored_events_index
        ids = []
        for s, name in zip(stored_events, self._names, strict=True):
            table.append(s)
            position = len(table)
            index[name][s.originator_version] = position - 1
            ids.append(position)
        return ids


class MemoryStore(RecorderStore):
    """Nothing survives the process. Non-blocking: the engine calls it on the loop."""

    blocking = False

    def __init__(self) -> None:
        super().__init__(LeanPOPORecorder())
        self._runs: dict[UUID, RunRow] = {}
        self._position = 0
        self._rm_lock = threading.Lock()

    def append(self, records: Sequence[Record]) -> None:
        # No lock timeouts in memory: skip the retry wrapper, call the recorder directly.
        if not records:
            return
        try:
            self.recorder.insert_events([
                StoredEvent(r.run_id, r.seq, r.topic, r.data) for r in records])
        except IntegrityError:
            run_ids = sorted({r.run_id for r in records}, key=str)
            raise ConcurrencyConflict(
                "an event already exists at one of these positions; nothing was written",
                run_ids) from None
    def apply_run_changes(self, changes: Sequence[RunChange], position: int) -> None:
        with self._rm_lock:
            if position <= self._position:
                return
            for change in changes:
                row = self._runs.get(change.run_id)
                if row is None:
                    if change.workflow is None:
                        continue  # an end without a start cannot happen; ignore it
                    row = RunRow(change.run_id, change.workflow, change.status, change.version,
                                 change.at, change.at)
                elif change.version >= row.version:
                    row = RunRow(row.run_id, row.workflow, change.status, change.version,
                                 row.created_at, change.at)
                self._runs[change.run_id] = row
            self._position = position

    def run_changes_position(self) -> int:
        return self._position

    def list_runs(self, *, status: str | None = None, workflow: str | None = None,
                  limit: int = 100, offset: int = 0) -> list[RunRow]:
        with self._rm_lock:
            rows = [r for r in self._runs.values()
                    if (status is None or r.status == status)
                    and (workflow is None or r.workflow == workflow)]
        rows.sort(key=lambda r: (r.created_at, str(r.run_id)), reverse=True)
        return rows[offset:offset + limit]

    def count_runs(self) -> dict[str, int]:
        with self._rm_lock:
            return dict(Counter(r.status for r in self._runs.values()))
