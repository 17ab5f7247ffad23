"""In-memory store (`memory://`): the library's POPO recorder, for tests and quick runs."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Sequence
from uuid import UUID

from eventsourcing.popo import POPOApplicationRecorder

from engine.store import RunChange, RunRow

from .base import RecorderStore


class MemoryStore(RecorderStore):
    """Nothing survives the process. Non-blocking: the engine calls it on the loop."""

    blocking = False

    def __init__(self) -> None:
        super().__init__(POPOApplicationRecorder())
        self._runs: dict[UUID, RunRow] = {}
        self._position = 0
        self._rm_lock = threading.Lock()

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
