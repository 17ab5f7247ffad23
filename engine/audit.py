"""Verify a run's log: completeness, the hash chain, the fold, and that every decision re-derives.

Used by `rulebound verify FILE` (an exported log, offline) and `rulebound replay RUN
--verify` (from a store). Each check names the first event that fails it.

What a verification proves, and what it does not:

- The hash chain (sha256, unkeyed) proves the events are the ones that were hashed, in that
  order, with nothing edited, inserted, removed or reordered *between* the first and the last
  event. Anyone who can rewrite the whole file can recompute every hash, so the chain alone
  does not prove the file is the one the store holds.
- The closing manifest line of an export (run id, event count, head hash, terminal or not)
  catches events cut from the end while the manifest was kept. It is itself unkeyed: whoever
  cuts the end and rewrites the manifest too is caught only by an anchor.
- An anchor (`--head HASH`, the head hash `rulebound show RUN` prints from the store, or one
  kept elsewhere) ties the file to the store: if the last event's hash equals it, every
  event's content has the same values as the stored chain up to that point (the canonical
  serialisation is hashed, so the file's own bytes may differ: spacing, key order, escapes).
- Event ids and the run id are labels outside the chain (the stored format hashes only an
  event's content): no check can tell a relabelled copy from the original. Verification
  requires them to be well-formed and the ids unique, no more.

Exit codes of `verify` and `replay --verify` (`Report.exit_code`):

- `EXIT_OK` (0): every check passed, against the definition the run started on.
- 1: a user error before any check (no such file or run, a broken --app), from the CLI.
- `EXIT_FAILED` (2): a check failed, a divergence: the log was edited, cut or is
  incomplete, it does not fold, or the definition given no longer derives it: a recorded
  decision comes out differently, or the limits it gives differ from those recorded in
  RunStarted (a changed limit is a changed rule, even when no recorded decision came near
  it: the finding names event 1, then the first decision the new limit changes, if any).
- `EXIT_DEFINITION_CHANGED` (3): a notice only. The definition given is not the version the
  run started on (its hash differs), yet every recorded decision and every limit re-derives
  from it: a change that would not have changed this run (a step it never reached, say).
- `EXIT_UNCHECKED` (4): the chain and the fold passed, but the decisions could not be
  re-derived: the run's workflow version is not in the registry given (pass `--app`). Not
  a finding against the log, so never the exit code of a tampered one.

Every message is built from checked values or shows file content through `shown()` (a
bounded repr), and `Finding.__str__` escapes control characters whatever the message holds:
a crafted file cannot write terminal escapes through `verify`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson
from rulebound.domain.decider import decide
from rulebound.domain.definitions import Workflow
from rulebound.domain.events import DECIDER_EVENTS, TERMINAL_EVENTS, Event, RunStarted, parse_event
from rulebound.domain.state import RunState, evolve, replace
from rulebound.domain.wording import counted

from . import codec
from .store import Record

MANIFEST_FORMAT = "rulebound-export/1"
EXIT_OK = 0
EXIT_FAILED = 2
EXIT_DEFINITION_CHANGED = 3
EXIT_UNCHECKED = 4
_HASH = re.compile(r"[0-9a-f]{64}")
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_STATUS = {"RunCompleted": "completed", "RunFailed": "failed", "RunCancelled": "cancelled"}
STATUSES = ("completed", "failed", "cancelled", "running")


def printable(text: str) -> str:
    """`text` with every control or non-printable character (terminal escapes, newlines,
    bidirectional overrides) written as its escape, so it prints as one inert line."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                   for c in text)


def shown(value: Any, limit: int = 60) -> str:
    """A value taken from the file, for a message: its repr (which escapes control
    characters), cut to `limit` characters."""
    text = printable(repr(value))
    return text if len(text) <= limit else text[:limit - 1] + "…"


def status_of(events: list[Event]) -> str | None:
    """The run's status as the log's last event says it (None for an empty log)."""
    if not events:
        return None
    return _STATUS.get(events[-1].type, "running")


@dataclass
class Finding:
    seq: int | None
    check: str
    message: str

    def __str__(self) -> str:
        where = f"event {self.seq}" if self.seq is not None else "log"
        return printable(f"{where}: {self.check}: {self.message}")


@dataclass
class Report:
    events: int = 0
    run_id: str | None = None
    workflow: str | None = None
    definition_hash: str | None = None
    findings: list[Finding] = field(default_factory=list)
    # What does not fail the log but must be said: the definition is another version.
    notices: list[Finding] = field(default_factory=list)
    decisions_checked: int = 0
    state: RunState | None = None
    head_hash: str | None = None  # the hash of the last event of the log
    manifest: dict[str, Any] | None = None
    complete: bool = False  # the log holds every event its manifest (or anchor) says
    anchored: bool = False  # the head hash matched an anchor given by the caller
    terminal: bool = False  # the log ends with the run's end
    status: str | None = None  # derived from the last event: completed/failed/.../running
    definition_missing: bool = False  # decisions unchecked: no definition for the run's version

    @property
    def ok(self) -> bool:
        """Nothing to report: no finding and no notice."""
        return not self.findings and not self.notices

    @property
    def failed(self) -> bool:
        """A check failed (a divergence); notices alone do not fail a log."""
        return bool(self.findings)

    @property
    def exit_code(self) -> int:
        """EXIT_FAILED for a finding, EXIT_UNCHECKED when the only finding is a missing
        definition, else EXIT_DEFINITION_CHANGED for a notice, else EXIT_OK."""
        if self.definition_missing and len(self.findings) == 1:
            return EXIT_UNCHECKED
        if self.findings:
            return EXIT_FAILED
        return EXIT_DEFINITION_CHANGED if self.notices else EXIT_OK

    @property
    def first(self) -> Finding | None:
        return self.findings[0] if self.findings else None


def one_line(exc: BaseException) -> str:
    """An exception as one line; pydantic's multi-line validation errors are summarised as
    `field: problem; ...` after whatever the wrapping error said first."""
    summary = None
    cause: BaseException | None = exc
    while cause is not None and summary is None:
        errors = getattr(cause, "errors", None)
        if callable(errors) and type(cause).__name__ == "ValidationError":
            try:
                items = list(errors())
            except Exception:
                break
            parts = [f"{'.'.join(str(p) for p in e.get('loc', ())) or 'value'}: {e.get('msg')}"
                     for e in items[:3]]
            summary = "; ".join(parts) + (f" (+{len(items) - 3} more)" if len(items) > 3
                                          else "")
        cause = cause.__cause__
    text = str(exc)
    if summary is not None:
        first = text.splitlines()[0] if text else ""
        first = _PYDANTIC_TITLE.sub("", first).rstrip(" :")
        return f"{first}: {summary}" if first else summary
    return " ".join(text.split()) or type(exc).__name__


_PYDANTIC_TITLE = re.compile(r"\d+ validation errors? for .*$")


def split_manifest(lines: list[dict[str, Any]], report: Report
                   ) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """Separate the event lines from the closing manifest line (which must come last)."""
    at = [i for i, line in enumerate(lines) if isinstance(line, dict) and "manifest" in line]
    if not at:
        return lines, None
    if len(at) > 1:
        report.findings.append(Finding(None, "manifest", f"{len(at)} manifest lines; an "
                                       "export has exactly one, at the end"))
        return lines[:at[0]], None
    if at[0] != len(lines) - 1:
        report.findings.append(Finding(
            at[0] + 1, "manifest", f"{counted(len(lines) - 1 - at[0], 'line')} after the manifest "
            "(appended after the export was closed?)"))
        return lines[:at[0]], None
    manifest = lines[-1].get("manifest")
    problem = _manifest_problem(manifest)
    if problem:
        report.findings.append(Finding(None, "manifest", f"malformed manifest: {problem}"))
        return lines[:-1], None
    return lines[:-1], manifest


def _manifest_problem(manifest: Any) -> str | None:
    if not isinstance(manifest, dict):
        return "not an object"
    if manifest.get("format") != MANIFEST_FORMAT:
        return f"format {shown(manifest.get('format'))}, expected {MANIFEST_FORMAT!r}"
    count = manifest.get("events")
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        return "'events' must be a count"
    head = manifest.get("head_hash")
    if not isinstance(head, str) or not (_HASH.fullmatch(head) or head == codec.GENESIS_HASH):
        return "'head_hash' must be 64 hex digits"
    if not isinstance(manifest.get("terminal"), bool):
        return "'terminal' must be true or false"
    if not isinstance(manifest.get("run_id"), str) or not _UUID.fullmatch(manifest["run_id"]):
        return "'run_id' must be a run id (a UUID in lowercase hex with dashes)"
    if manifest.get("status", "") not in (*STATUSES, None):
        return f"'status' must be one of {', '.join(STATUSES)} (or null for an empty log)"
    return None


def check_chain(lines: Iterable[dict[str, Any]], report: Report) -> list[Event]:
    """Decode event lines and verify order and hashes; returns the decoded events.

    The hash is recomputed over the body exactly as recorded (canonical JSON of the line's
    `event`), and the decoded event must serialise back to that same body: an edit the
    decoder would quietly coerce (a number written as a string) is an edit too.

    Ids and the run id are not hashed (the stored format never did): they must be well-formed
    UUIDs, one run id for every line and no event id twice, which is all that can be checked.
    """
    events: list[Event] = []
    seen: dict[str, int] = {}
    prev = codec.GENESIS_HASH
    for expected, line in enumerate(lines, start=1):
        if not isinstance(line, dict):
            report.findings.append(Finding(expected, "decode", "not a JSON object"))
            return events
        seq, run_id = line.get("seq"), line.get("run_id")
        if not isinstance(run_id, str) or not _UUID.fullmatch(run_id):
            report.findings.append(Finding(expected, "decode", f"run id {shown(run_id)} is "
                                           "not a UUID in lowercase hex with dashes"))
            return events
        if report.run_id is None:
            report.run_id = run_id
        elif run_id != report.run_id:
            report.findings.append(Finding(expected, "integrity",
                                           f"belongs to run {run_id}, not {report.run_id} "
                                           "(inserted?)"))
            return events
        if type(seq) is not int or seq != expected:  # not a bool, not 1.0, not "1"
            report.findings.append(Finding(
                expected, "integrity", f"sequence number {shown(seq)} where {expected} was "
                "expected (an event was removed, inserted or reordered)"))
            return events
        missing = [k for k in ("id", "hash", "event") if k not in line]
        if missing:
            report.findings.append(Finding(expected, "decode", f"missing {', '.join(missing)}"))
            return events
        event_id = line["id"]
        if event_id is None and line["hash"] is None and line["event"] is None:
            report.findings.append(Finding(expected, "decode", "the stored event is "
                                           "unreadable (not a JSON object, or a compacted "
                                           "row that does not inflate)"))
            return events
        if not isinstance(event_id, str) or not _UUID.fullmatch(event_id):
            report.findings.append(Finding(expected, "decode", f"event id {shown(event_id)} is "
                                           "not a UUID in lowercase hex with dashes"))
            return events
        if event_id in seen:
            report.findings.append(Finding(
                expected, "integrity", f"event id {event_id} is also the id of event "
                f"{seen[event_id]}; ids are unique (relabelled? ids are outside the chain)"))
            return events
        seen[event_id] = expected
        body_dict, digest = line["event"], line["hash"]
        if not isinstance(body_dict, dict) or not isinstance(digest, str):
            report.findings.append(Finding(expected, "decode",
                                           "'event' must be an object and 'hash' a string"))
            return events
        try:
            event = parse_event({**body_dict, "id": line["id"], "hash": digest})
            recorded = orjson.dumps(body_dict, option=orjson.OPT_SORT_KEYS)
        except Exception as exc:
            report.findings.append(Finding(expected, "decode", one_line(exc)))
            return events
        if codec.chain_hash(prev, recorded) != digest:
            report.findings.append(Finding(
                expected, "integrity", f"{event.type}: hash does not match its content and "
                "its predecessor (edited, removed or reordered)"))
            return events
        if codec.canonical_body(event) != recorded:
            report.findings.append(Finding(
                expected, "integrity", f"{event.type}: its content does not round-trip: "
                "decoded and serialised again it is not what was hashed (edited, or recorded "
                "by another schema version)"))
            return events
        prev = digest
        events.append(event)
    report.events = len(events)
    report.head_hash = prev
    report.terminal = bool(events) and events[-1].type in TERMINAL_EVENTS
    report.status = status_of(events)
    return events


def check_manifest(events: list[Event], manifest: dict[str, Any], report: Report) -> None:
    """The log must end exactly where its manifest says, on the head hash it names."""
    report.manifest = manifest
    count, head = manifest["events"], manifest["head_hash"]
    if report.run_id is not None and manifest["run_id"] != report.run_id:
        report.findings.append(Finding(None, "manifest", f"the manifest is for run "
                                       f"{manifest['run_id']}, the events for {report.run_id}"))
        return
    if len(events) < count:
        report.findings.append(Finding(
            len(events) + 1, "completeness", f"missing: the log ends after event "
            f"{len(events)} but its manifest says {counted(count, 'event')} (events were "
            "removed from the end)"))
        return
    if len(events) > count:
        report.findings.append(Finding(
            count + 1, "completeness", f"the manifest says {counted(count, 'event')}, the log "
            f"holds {counted(len(events), 'event')} (events were added, or the manifest was "
            "edited)"))
        return
    if head != report.head_hash:
        report.findings.append(Finding(
            None, "manifest", f"head hash {head[:16]}… in the manifest differs from the last "
            f"event's hash {str(report.head_hash)[:16]}… (the log or the manifest was edited)"))
        return
    if manifest["terminal"] != report.terminal:
        says = "ended" if manifest["terminal"] else "was still going"
        report.findings.append(Finding(
            None, "manifest", f"the manifest says the run {says}, the last event "
            f"({events[-1].type if events else 'none'}) says otherwise"))
        return
    if manifest["status"] != report.status:
        report.findings.append(Finding(
            None, "manifest", f"the manifest says the run is {shown(manifest['status'])}, "
            f"its last event ({events[-1].type if events else 'none'}) says "
            f"{report.status or 'nothing'} (the manifest was edited)"))
        return
    report.complete = True


def check_anchor(events: list[Event], anchor: str, report: Report) -> None:
    """The last event's hash must be the anchor (a head hash taken from the store)."""
    if report.head_hash == anchor:
        report.anchored = report.complete = True
        return
    matches = [i for i, e in enumerate(events, start=1) if e.hash == anchor]
    if matches:
        at = matches[0]
        report.findings.append(Finding(
            at + 1, "anchor", f"the --head anchor is the hash of event {at}; the log goes on "
            f"for {counted(len(events) - at, 'more event')} the anchor does not cover "
            "(appended after the anchor was taken, or forged)"))
        return
    report.findings.append(Finding(
        None, "anchor", f"the log's head hash {str(report.head_hash)[:16]}… is not the --head "
        f"anchor {anchor[:16]}…: no event of the log carries it (the log was rewritten and "
        "re-chained, cut short, or is from another run)"))


def check_fold(events: list[Event], report: Report) -> RunState | None:
    state = RunState()
    for seq, event in enumerate(events, start=1):
        try:
            state = evolve(state, event)
        except Exception as exc:
            report.findings.append(Finding(seq, "fold", f"{event.type}: {one_line(exc)}"))
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
        report.definition_missing = True
        report.findings.append(Finding(1, "definition", f"workflow {shown(head.workflow)} "
                                       f"version {head.definition_hash[:12]} is not in "
                                       "the registry"))
        return
    if definition.name != head.workflow:  # the hash covers the name: this is an edit
        report.findings.append(Finding(
            1, "definition", f"the run names workflow {shown(head.workflow)}, but its "
            f"definition {definition.hash[:12]} is {definition.name!r}"))
        return
    if definition.hash != head.definition_hash:
        report.notices.append(Finding(
            1, "definition", f"the run started on definition {head.definition_hash[:12]}, "
            f"the registry has {definition.hash[:12]}; checking its decisions against it"))
    limits = rederived_limits(head, definition)
    changed = _limit_changes(head.limits, limits)
    if changed:
        report.findings.append(Finding(
            1, "limits", f"RunStarted does not re-derive: {changed} (a changed limit is a "
            "changed rule; checking the decisions under the new limits)"))
    state = RunState()
    i = 0
    while i < len(events):
        event = events[i]
        if event.type not in DECIDER_EVENTS:
            state = evolve(state, event)
            if i == 0 and changed:
                state = replace(state, limits=limits)
            i += 1
            continue
        j = i
        while j < len(events) and events[j].type in DECIDER_EVENTS:
            j += 1
        recorded = events[i:j]
        try:
            expected = decide(definition, state, recorded[0].at)
        except Exception as exc:
            report.findings.append(Finding(i + 1, "decisions",
                                           f"the decider failed: {one_line(exc)}"))
            return
        for k, (got, want) in enumerate(zip(recorded, expected, strict=False)):
            if not _same_decision(got, want):
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
    try:
        trailing = decide(definition, state, events[-1].at)
    except Exception as exc:
        report.findings.append(Finding(len(events) + 1, "decisions",
                                       f"the decider failed: {one_line(exc)}"))
        return
    if trailing:
        report.findings.append(Finding(len(events) + 1, "decisions",
                                       f"the definition now decides {trailing[0].type} after "
                                       "the last event; the recorded run did not"))


# A decision is compared on its body, message included. Before the decider counted its
# nouns, a count of one read "1 attempts used" and "1 attempts of this visit were
# abandoned": a log recorded then still re-derives.
_OLD_WORDING = ((re.compile(r"\(1 attempt used\)$"), "(1 attempts used)"),
                (re.compile(r"; 1 attempt of this visit was abandoned, "),
                 "; 1 attempts of this visit were abandoned, "))


def _same_decision(got: Event, want: Event) -> bool:
    """Whether a recorded decision is the re-derived one, in today's wording or the old."""
    recorded, derived = got.body(), want.body()
    if recorded == derived:
        return True
    message = derived.get("message")
    if not isinstance(message, str):
        return False
    for pattern, old in _OLD_WORDING:
        message = pattern.sub(old, message)
    return recorded == {**derived, "message": message}


def rederived_limits(head: RunStarted, definition: Workflow) -> dict[str, Any]:
    """The limits `definition` gives a run that recorded `head`.

    Only the limits the run recorded are re-derived: a limit it did not record (one added to
    rulebound after the run started, such as `max_abandoned`) was not in force for it, and
    its absence keeps the rule the run ran under.
    """
    given = definition.limits.model_dump()
    return {name: given.get(name, value) for name, value in head.limits.items()}


def _limit_changes(recorded: dict[str, Any], derived: dict[str, Any]) -> str:
    """What differs between recorded and re-derived limits, as `name: recorded a, the
    definition gives b; ...` (empty when nothing does)."""
    return "; ".join(f"{name}: recorded {shown(recorded[name])}, the definition gives "
                     f"{shown(derived[name])}"
                     for name in sorted(derived) if derived[name] != recorded[name])


def _diff(got: Event, want: Event) -> str:
    a, b = got.body(), want.body()
    keys = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    if got.type != want.type:
        return f"{got.type} does not re-derive: the definition now decides {want.type} here"
    parts = [f"{k}: recorded {a.get(k)!r}, re-decided {b.get(k)!r}" for k in keys[:3]]
    return f"{got.type} does not re-derive ({'; '.join(parts)})"


def verify_lines(lines: Iterable[dict[str, Any]], definition_for: Any, *,
                 require_manifest: bool = True, head: str | None = None) -> Report:
    """Every check over exported lines; `definition_for(hash, name)` finds definitions.

    `require_manifest`: a log without its closing manifest fails as incomplete/unanchored
    (events cut from its end could not be noticed), unless `head` anchors it. `head`: the
    hash the last event must carry (taken from the store).
    """
    report = Report()
    rows, manifest = split_manifest(list(lines), report)
    if report.findings:
        return report
    events = check_chain(rows, report)
    if report.findings:
        return report
    if manifest is not None:
        check_manifest(events, manifest, report)
        if report.findings:
            return report
    if head is not None:
        check_anchor(events, head, report)
        if report.findings:
            return report
    if manifest is None and require_manifest and not report.anchored:
        report.findings.append(Finding(
            None, "completeness", "incomplete/unanchored: the log has no closing manifest, so "
            "events cut from its end would go unnoticed; verify the full output of "
            "`rulebound export`, anchor it with --head HASH, or pass --partial to check it as "
            "a prefix"))
        return report
    if check_fold(events, report) is None:
        return report
    first = events[0] if events else None
    definition = (definition_for(first.definition_hash, first.workflow)
                  if isinstance(first, RunStarted) else None)
    check_decisions(events, definition, report)
    return report


def manifest_line(run_id: str, lines: list[dict[str, Any]]) -> dict[str, Any]:
    """The closing line of an export: what a complete copy of this log looks like."""
    last = lines[-1] if lines else None
    last_type = (last.get("event") or {}).get("type") if last is not None else None
    head = last.get("hash") if last is not None else None
    return {"manifest": {
        "format": MANIFEST_FORMAT, "run_id": run_id, "events": len(lines),
        "head_hash": head if isinstance(head, str) else codec.GENESIS_HASH,
        "terminal": last_type in TERMINAL_EVENTS,
        "status": _STATUS.get(str(last_type), "running") if last is not None else None}}


def export_lines(run_id: str, events: list[Event], *,
                 manifest: bool = True) -> list[dict[str, Any]]:
    """The JSON-lines export of decoded events: one object per event with its place and
    stamp, then the closing manifest line."""
    lines = [{"run_id": run_id, "seq": seq, "id": str(e.id), "hash": e.hash,
              "event": orjson.loads(codec.canonical_body(e))}
             for seq, e in enumerate(events, start=1)]
    return [*lines, manifest_line(run_id, lines)] if manifest else lines


def record_lines(run_id: str, records: list[Record]) -> list[dict[str, Any]]:
    """Stored records as export lines, each event's body exactly as stored (not re-serialised
    from a decoded event): what `export` writes and `replay --verify` checks. A record that
    is not a JSON object becomes a line that fails to decode, at its place."""
    lines: list[dict[str, Any]] = []
    for record in records:
        try:
            raw = orjson.loads(record.data)
        except orjson.JSONDecodeError:
            raw = None
        if not isinstance(raw, dict):
            raw = {}
        lines.append({"run_id": run_id, "seq": record.seq, "id": raw.get("id"),
                      "hash": raw.get("hash"), "event": raw.get("event")})
    return lines


def export_text(lines: list[dict[str, Any]]) -> str:
    """Export lines as the text `export` and `archive` write: one JSON object a line."""
    return "".join(json.dumps(line, ensure_ascii=False, sort_keys=True) + "\n"
                   for line in lines)


def export_records(run_id: str, records: list[Record]) -> list[dict[str, Any]]:
    """The export of a run from its stored records, closed by its manifest line."""
    lines = record_lines(run_id, records)
    return [*lines, manifest_line(run_id, lines)]
