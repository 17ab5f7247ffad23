"""Verify a run's log: the hash chain, the fold, and that every decision re-derives.

Used by `rulebound verify FILE` (an exported log, offline) and `rulebound replay RUN
--verify` (from a store). Each check names the first event that fails it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson

from domain.decider import decide
from domain.definitions import Workflow
from domain.events import DECIDER_EVENTS, Event, RunStarted
from domain.state import RunState, evolve

from . import codec


@dataclass
class Finding:
    seq: int
    check: str
    message: str

    def __str__(self) -> str:
        return f"event {self.seq}: {self.check}: {self.message}"


@dataclass
class Report:
    events: int = 0
    run_id: str | None = None
    workflow: str | None = None
    definition_hash: str | None = None
    findings: list[Finding] = field(default_factory=list)
    decisions_checked: int = 0
    state: RunState | None = None

    @property
    def ok(self) -> bool:
        return not self.findings

    @property
    def first(self) -> Finding | None:
        return self.findings[0] if self.findings else None


def check_chain(lines: Iterable[dict[str, Any]], report: Report) -> list[Event]:
    """Decode exported lines and verify order and hashes; returns the decoded events."""
    events: list[Event] = []
    prev = codec.GENESIS_HASH
    for expected, line in enumerate(lines, start=1):
        seq = line.get("seq")
        if report.run_id is None:
            report.run_id = line.get("run_id")
        elif line.get("run_id") != report.run_id:
            report.findings.append(Finding(expected, "integrity",
                                           f"belongs to run {line.get('run_id')}, not "
                                           f"{report.run_id} (inserted?)"))
            return events
        if seq != expected:
            report.findings.append(Finding(
                expected, "integrity", f"sequence number {seq} where {expected} was expected "
                "(an event was removed, inserted or reordered)"))
            return events
        try:
            event = codec.decode(orjson.dumps({"id": line["id"], "hash": line["hash"],
                                               "event": line["event"]}))
        except Exception as exc:
            report.findings.append(Finding(expected, "decode", str(exc)))
            return events
        body = codec.canonical_body(event)
        if codec.chain_hash(prev, body) != line["hash"]:
            report.findings.append(Finding(
                expected, "integrity", f"{event.type}: hash does not match its content and "
                "its predecessor (edited, removed or reordered)"))
            return events
        prev = line["hash"]
        events.append(event)
    report.events = len(events)
    return events


def check_fold(events: list[Event], report: Report) -> RunState | None:
    state = RunState()
    for seq, event in enumerate(events, start=1):
        try:
            state = evolve(state, event)
        except Exception as exc:
            report.findings.append(Finding(seq, "fold", f"{event.type}: {exc}"))
            return None
    report.state = state
    return state


def check_decisions(events: list[Event], definition: Workflow | None, report: Report) -> None:
    """Re-run the decider over the history; every recorded decision must come out again."""
    if not events or not isinstance(events[0], RunStarted):
        report.findings.append(Finding(1, "decisions", "the log does not start with RunStarted"))
        return
    head = events[0]
    report.workflow, report.definition_hash = head.workflow, head.definition_hash
    if definition is None:
        report.findings.append(Finding(1, "definition", f"workflow {head.workflow!r} version "
                                       f"{head.definition_hash[:12]} is not in the registry"))
        return
    if definition.hash != head.definition_hash:
        report.findings.append(Finding(
            1, "definition", f"the run started on definition {head.definition_hash[:12]}, the "
            f"registry has {definition.hash[:12]}; checking its decisions against it"))
    state = RunState()
    i = 0
    while i < len(events):
        event = events[i]
        if event.type not in DECIDER_EVENTS:
            state = evolve(state, event)
            i += 1
            continue
        j = i
        while j < len(events) and events[j].type in DECIDER_EVENTS:
            j += 1
        recorded = events[i:j]
        try:
            expected = decide(definition, state, recorded[0].at)
        except Exception as exc:
            report.findings.append(Finding(i + 1, "decisions", f"the decider failed: {exc}"))
            return
        for k, (got, want) in enumerate(zip(recorded, expected, strict=False)):
            if got.body() != want.body():
                report.findings.append(Finding(i + k + 1, "decisions", _diff(got, want)))
                return
        if len(expected) != len(recorded):
            seq = i + min(len(expected), len(recorded)) + 1
            report.findings.append(Finding(
                seq, "decisions", f"recorded {len(recorded)} decisions here, the definition "
                f"now makes {len(expected)}"))
            return
        report.decisions_checked += len(recorded)
        for got in recorded:
            state = evolve(state, got)
        i = j
    trailing = decide(definition, state, events[-1].at)
    if trailing:
        report.findings.append(Finding(len(events) + 1, "decisions",
                                       f"the definition now decides {trailing[0].type} after "
                                       "the last event; the recorded run did not"))


def _diff(got: Event, want: Event) -> str:
    a, b = got.body(), want.body()
    keys = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    parts = [f"{k}: recorded {a.get(k)!r}, re-decided {b.get(k)!r}" for k in keys[:3]]
    return f"{got.type} does not re-derive ({'; '.join(parts)})"


def verify_lines(lines: Iterable[dict[str, Any]], definition_for: Any) -> Report:
    """All three checks over exported lines; `definition_for(hash, name)` finds definitions."""
    report = Report()
    events = check_chain(lines, report)
    if report.findings:
        return report
    if check_fold(events, report) is None:
        return report
    head = events[0] if events else None
    definition = (definition_for(head.definition_hash, head.workflow)
                  if isinstance(head, RunStarted) else None)
    check_decisions(events, definition, report)
    return report


def export_lines(run_id: str, events: list[Event]) -> list[dict[str, Any]]:
    """The JSON-lines export of a run: one object per event with its place and stamp."""
    return [{"run_id": run_id, "seq": seq, "id": str(e.id), "hash": e.hash,
             "event": orjson.loads(codec.canonical_body(e))}
            for seq, e in enumerate(events, start=1)]
