"""Run snapshots: a run's folded state at some version, so a load folds only later events.

A snapshot is derived data, never the source of truth: it is used only if it matches the
log (the event at its version exists and carries the hash the snapshot recorded) and was
written by the same fold (the `fold` tag: a digest of the domain code that folds events,
so a release that changes the fold ignores older snapshots and writes new ones). Anything
else (no snapshot, a mismatch, bytes that do not decode) means: fold from the first event,
as without snapshots, and write a fresh one.

Stored bytes: orjson of {"format": 1, "fold": tag, "hash": head hash at `version`,
"state": RunState.to_dict()}. A snapshot is written only after checking that it decodes
back to the very state it was made from, so a state a snapshot cannot carry faithfully is
simply never snapshotted.

Why not the eventsourcing library's snapshotting: its Application/Repository snapshots an
`Aggregate` through the library's mapper and transcoder, and checks only the version;
rulebound keeps its own event bytes and hash chain (engine.codec) and its state is a fold of
frozen dataclasses, not an Aggregate. What fits is the layer below, which the stores use:
an aggregate recorder in a table of its own (`rulebound_snapshots`, the layout the library
gives an application's snapshot table), keyed by (run, version).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import fields
from functools import cache
from pathlib import Path
from typing import Any
from uuid import UUID

import orjson
from rulebound.domain import events as ev_module
from rulebound.domain import state as state_module
from rulebound.domain.state import RunState, StepState

from .store import Snapshot

log = logging.getLogger("rulebound.snapshots")
FORMAT = 1
# A load that folds at least this many events past the newest snapshot writes a new one,
# so a load never folds much more than this many events (plus the snapshot's decode).
SNAPSHOT_EVERY = 200


@cache
def fold_tag() -> str:
    """A digest of the code that defines a fold (domain/state.py and domain/events.py)."""
    digest = hashlib.sha256()
    for module in (state_module, ev_module):
        try:
            digest.update(Path(module.__file__ or "").read_bytes())
        except OSError:  # no source shipped: the field layout, at least
            digest.update(repr([f.name for t in (RunState, StepState)
                                for f in fields(t)]).encode())
    return digest.hexdigest()[:16]


def encode(run_id: UUID, version: int, head_hash: str, state: RunState) -> Snapshot | None:
    """The snapshot of `state` (the fold of the run's first `version` events, the last of
    which has hash `head_hash`), or None if it would not decode back to `state`."""
    data = orjson.dumps({"format": FORMAT, "fold": fold_tag(), "hash": head_hash,
                         "state": state.to_dict()}, option=orjson.OPT_SORT_KEYS)
    back = decode(data)
    if back is None or back[0] != state or back[0].version != version:
        log.debug("run %s: state at %d does not round-trip; no snapshot", run_id, version)
        return None
    return Snapshot(run_id, version, data)


def decode(data: bytes) -> tuple[RunState, str] | None:
    """(state, head hash) from a snapshot's bytes; None for another format or fold, or
    bytes that do not decode."""
    try:
        raw: dict[str, Any] = orjson.loads(data)
        if raw.get("format") != FORMAT or raw.get("fold") != fold_tag():
            return None
        head = raw["hash"]
        if not isinstance(head, str):
            return None
        return RunState.from_dict(raw["state"]), head
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
