"""In-memory store (`memory://`): the library's POPO recorder, for tests and quick runs."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any
from uuid import UUID

from eventsourcing.persistence import IntegrityError, Notification, StoredEvent
from eventsourcing.popo import POPOApplicationRecorder
from rulebound.engine.store import ConcurrencyConflict, Fence, Record, RunChange, RunRow, Snapshot

from .base import RecorderStore


class LeanPOPORecorder(POPOApplicationRecorder):
    """The library's POPO recorder with the same tables and guarantees, written for speed.

    The base class converts every event's UUID to text twice per insert (about 1.5 us each),
    builds a set of all new keys and goes through four method calls; an in-memory append is
    on the engine's hot path (one per step), so this variant checks and inserts in one pass
    under the same lock, converting each stream id once. The library's own recorder test
    cases run against this class (tests/stores/test_library_recorder_cases).
    """

    def __init__(self) -> None:
        super().__init__()
        self._names: dict[Any, str] = {}  # stream id -> its text (UUID.__str__ is ~1 us)

    def insert_events(self, stored_events: Sequence[StoredEvent], **_: Any) -> list[int]:
        with self._database_lock:
            index = self._stored_events_index
            keys: list[tuple[dict[int, int], int]] = []
            last: Any = None
            positions: dict[int, int] = {}
            new: set[tuple[str, int]] = set()
            name = ""
            names = self._names
            for s in stored_events:  # check everything first: all or nothing
                if s.originator_id is not last:  # an append is mostly one run
                    last = s.originator_id
                    known = names.get(last)
                    if known is None:
                        known = names[last] = str(last)
                    name = known
                    positions = index[name]
                version = s.originator_version
                if version in positions or (name, version) in new:
                    raise IntegrityError(f"Stored event already recorded: {s}")
                new.add((name, version))
                keys.append((positions, version))
            table = self._stored_events
            ids = []
            for s, (positions, version) in zip(stored_events, keys, strict=True):
                positions[version] = len(table)
                table.append(s)
                ids.append(len(table))
        self._notify_listeners()
        return ids

    def delete_streams(self, streams: Mapping[UUID, int]) -> list[UUID]:
        """Remove each stream whose last version is the one given (all its versions,
        1..n, present). A removed event's place in the table is left empty, so notification
        ids are never reused: the table keeps gaps, as PostgreSQL's does after a rollback."""
        removed = []
        with self._database_lock:
            table = self._stored_events
            for stream, version in streams.items():
                positions = self._stored_events_index.get(str(stream))
                if not positions or len(positions) != version or max(positions) != version:
                    continue
                for index in positions.values():
                    table[index] = None  # type: ignore[call-overload]
                del self._stored_events_index[str(stream)]
                self._names.pop(stream, None)
                removed.append(stream)
        return removed

    def select_notifications(self, start: int | None, limit: int, stop: int | None = None,
                             topics: Sequence[str] = (), *, inclusive_of_start: bool = True
                             ) -> Sequence[Notification]:
        """The library's select, skipping the places of removed events."""
        with self._database_lock:
            first = 1 if start is None else start + (0 if inclusive_of_start or start is None
                                                     else 1)
            i = max(first, 1) - 1
            table = self._stored_events
            end = len(table) if stop is None else min(len(table), stop)
            results: list[Notification] = []
            while i < end and len(results) < limit:
                s = table[i]
                i += 1
                if s is None or (topics and s.topic not in topics):
                    continue
                results.append(Notification(id=i, originator_id=s.originator_id,
                                            originator_version=s.originator_version,
                                            topic=s.topic, state=s.state))
            return results


_new = object.__new__


def _stored_event(record: Record) -> StoredEvent:
    """A StoredEvent without its frozen __init__ (four guarded setattrs per event, five
    events per step). StoredEvent is a plain frozen dataclass: fields live in __dict__."""
    event = _new(StoredEvent)
    event.__dict__.update(originator_id=record.run_id, originator_version=record.seq,
                          topic=record.topic, state=record.data)
    return event


class MemoryStore(RecorderStore):
    """Nothing survives the process. Non-blocking: the engine calls it on the loop."""

    blocking = False
    compact_rows = False

    def __init__(self) -> None:
        super().__init__(LeanPOPORecorder())
        self._runs: dict[UUID, RunRow] = {}
        self._position = 0
        self._rm_lock = threading.Lock()
        self._snapshots: dict[UUID, Snapshot] = {}
        self._parked: dict[UUID, float] = {}  # run -> when it is due (epoch seconds)

    def append(self, records: Sequence[Record], fence: Fence | None = None) -> None:
        # No lock timeouts in memory: skip the retry wrapper, call the recorder directly.
        # No leases either (one engine per memory store): a fence has nothing to check.
        if not records:
            return
        try:
            self.recorder.insert_events([_stored_event(r) for r in records])
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

    # --- parked runs: nothing to do until a signal or a far-off timer ---------------------

    def park(self, run_id: UUID, until: float, version: int | None = None) -> None:
        del version  # one engine per store: no other engine can leave a row stale
        with self._rm_lock:
            self._parked[run_id] = until

    def unpark(self, run_id: UUID) -> None:
        with self._rm_lock:
            self._parked.pop(run_id, None)

    def parked_due(self, until: float, limit: int = 1000) -> list[UUID]:
        with self._rm_lock:
            return sorted((r for r, at in self._parked.items() if at <= until),
                          key=self._parked.__getitem__)[:limit]

    def runs_to_recover(self, now: float, limit: int = 500, offset: int = 0) -> list[UUID]:
        with self._rm_lock:
            going = [r.run_id for r in sorted(self._runs.values(),
                                              key=lambda r: (r.created_at, str(r.run_id)))
                     if r.status == "running" and self._parked.get(r.run_id, 0.0) <= now]
        return going[offset:offset + limit]

    def delete_runs(self, runs: Mapping[UUID, int]) -> list[UUID]:
        assert isinstance(self.recorder, LeanPOPORecorder)
        with self._rm_lock:  # no listing sees a row whose events are gone
            removed = self.recorder.delete_streams(runs)
            for run_id in removed:
                self._runs.pop(run_id, None)
                self._snapshots.pop(run_id, None)
        return removed

    def read_snapshot(self, run_id: UUID) -> Snapshot | None:
        return self._snapshots.get(run_id)

    def write_snapshot(self, snapshot: Snapshot) -> None:
        recorder = self.recorder
        assert isinstance(recorder, LeanPOPORecorder)
        with self._rm_lock, recorder._database_lock:  # the order delete_runs takes them in
            positions = recorder._stored_events_index.get(str(snapshot.run_id))
            if not positions or snapshot.version not in positions:
                return  # the run was removed (or is shorter): no orphan snapshot
            self._snapshots[snapshot.run_id] = snapshot
