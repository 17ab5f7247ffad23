"""Events to bytes and back (orjson), and the per-run hash chain that makes logs tamper-evident.

The stored form of an event is `{"id": ..., "hash": ..., "event": <canonical body>}` where the
canonical body is the event without its stamp, serialised with sorted keys. The hash of event
n is sha256(hash of event n-1 || canonical body of n), starting from `GENESIS_HASH`, so an
edited, removed, reordered or inserted event breaks every hash after it.
"""

from __future__ import annotations

import hashlib
from typing import Any
from uuid import UUID

import orjson

from domain.errors import CorruptRun
from domain.events import Event, parse_event

GENESIS_HASH = "0" * 64
_OPTS = orjson.OPT_SORT_KEYS


def canonical_body(event: Event) -> bytes:
    """The event minus its stamp, as deterministic JSON bytes."""
    return orjson.dumps(event.model_dump(exclude={"id", "hash"}), option=_OPTS)


def chain_hash(prev_hash: str, body: bytes) -> str:
    digest = hashlib.sha256(prev_hash.encode())
    digest.update(body)
    return digest.hexdigest()


def stamp(event: Event, event_id: UUID, prev_hash: str) -> tuple[Event, bytes]:
    """Give an event its id and chain hash; returns the stamped event and its stored bytes."""
    body = canonical_body(event)
    digest = chain_hash(prev_hash, body)
    stamped = event.model_copy(update={"id": event_id, "hash": digest})
    data = orjson.dumps({"id": str(event_id), "hash": digest, "event": orjson.Fragment(body)})
    return stamped, data


def encode(event: Event) -> bytes:
    """Stored bytes of an already stamped event."""
    if event.id is None or event.hash is None:
        raise ValueError(f"{event.type} is not stamped; call stamp() before storing it")
    body = canonical_body(event)
    return orjson.dumps({"id": str(event.id), "hash": event.hash, "event": orjson.Fragment(body)})


def decode(data: bytes | str, *, run_id: object = None, seq: int | None = None) -> Event:
    """Stored bytes to a typed event; any failure is a `CorruptRun` naming run and position."""
    try:
        raw: dict[str, Any] = orjson.loads(data)
        body = dict(raw["event"])
        body["id"] = raw["id"]
        body["hash"] = raw["hash"]
        return parse_event(body)
    except Exception as exc:  # any decoding failure means the stored event is unusable
        raise CorruptRun(run_id, f"cannot decode event: {exc}", seq=seq) from exc


def to_json(value: Any) -> bytes:
    """orjson with the options used everywhere we print or export JSON."""
    return orjson.dumps(value, option=_OPTS)
