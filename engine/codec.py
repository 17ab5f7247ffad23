"""Events to bytes and back (orjson), and the per-run hash chain that makes logs tamper-evident.

The stored form of an event is `{"id": ..., "hash": ..., "event": <canonical body>}` where the
canonical body is the event without its stamp, serialised with sorted keys. The hash of event
n is sha256(hash of event n-1 || canonical body of n), starting from `GENESIS_HASH`, so an
edited, removed, reordered or inserted event breaks every hash after it.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any
from uuid import UUID

import orjson
from pydantic import BaseModel
from rulebound.domain.errors import CorruptRun
from rulebound.domain.events import Event, parse_event

GENESIS_HASH = "0" * 64
_sha256 = hashlib.sha256
_OPTS = orjson.OPT_SORT_KEYS


def _plain(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.__dict__
    raise TypeError(f"cannot serialise {type(value).__name__}")


def canonical_body(event: Event) -> bytes:
    """The event minus its stamp, as deterministic JSON bytes.

    Serialises the model's field dict directly (pydantic keeps field values in __dict__):
    the same bytes as model_dump() + orjson, without building an intermediate dict tree.
    """
    fields = event.__dict__.copy()  # a C-level copy beats filtering in Python
    del fields["id"], fields["hash"]
    for name in event.optional_fields:
        if fields[name] is None:
            del fields[name]
    return orjson.dumps(fields, default=_plain, option=_OPTS)


def chain_hash(prev_hash: str, body: bytes) -> str:
    return _sha256(prev_hash.encode() + body).hexdigest()


def stamp(event: Event, event_id: UUID | str, prev_hash: str) -> tuple[str, bytes]:
    """An event's chain hash and stored bytes, given its id and its predecessor's hash.

    The in-memory event is left unstamped (copying a model per event is measurable on the
    hot path); `stamped` makes the stamped copy when someone needs one.
    """
    # canonical_body, chain_hash and _stored inlined (same steps, same bytes): this runs for
    # every event on the hot path, about five per step, and each call frame is measurable.
    fields = event.__dict__.copy()
    del fields["id"], fields["hash"]
    for name in event.optional_fields:
        if fields[name] is None:
            del fields[name]
    body = orjson.dumps(fields, default=_plain, option=_OPTS)
    digest = _sha256(prev_hash.encode() + body).hexdigest()
    return digest, b'{"event":%b,"hash":"%b","id":"%b"}' % (body, digest.encode(),
                                                             str(event_id).encode())


def _stored(body: bytes, digest: str, event_id: UUID | str) -> bytes:
    """The one stored layout (keys sorted, like the body), written without re-parsing."""
    return b'{"event":%b,"hash":"%b","id":"%b"}' % (body, digest.encode(),
                                                    str(event_id).encode())


def stamped(event: Event, event_id: UUID | str, digest: str) -> Event:
    """A copy of `event` carrying its stamp (for watchers, who get what `events()` returns)."""
    uid = event_id if isinstance(event_id, UUID) else UUID(event_id)
    return event.model_copy(update={"id": uid, "hash": digest})


def encode(event: Event) -> bytes:
    """Stored bytes of an already stamped event."""
    if event.id is None or event.hash is None:
        raise ValueError(f"{event.type} is not stamped; call stamp() before storing it")
    return _stored(canonical_body(event), event.hash, event.id)


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


def check_json(value: Any) -> str | None:
    """Why `value` cannot be stored as JSON (an integer beyond 64 bits, a set, an infinite
    or NaN float, which orjson would quietly write as null), or None."""
    try:
        orjson.dumps(value, option=_OPTS)
    except (orjson.JSONEncodeError, TypeError) as exc:
        return str(exc)
    if _has_non_finite(value):
        return "an infinite or NaN number (JSON has none; it would be stored as null)"
    return None


def _has_non_finite(value: Any) -> bool:
    if type(value) is float:
        return not math.isfinite(value)
    if isinstance(value, dict):
        return any(_has_non_finite(v) for v in value.values())
    if isinstance(value, list | tuple):
        return any(_has_non_finite(v) for v in value)
    if isinstance(value, BaseModel):
        return _has_non_finite(value.__dict__)
    return False


def to_json(value: Any) -> bytes:
    """orjson with the options used everywhere we print or export JSON."""
    return orjson.dumps(value, option=_OPTS)
