"""Events to bytes and back (orjson), and the per-run hash chain that makes logs tamper-evident.

The canonical body of an event is the event without its stamp (id and hash), serialised with
sorted keys. The hash of event n is sha256(hash of event n-1 || canonical body of n), starting
from `GENESIS_HASH`, so an edited, removed, reordered or inserted event breaks every hash
after it. An event is stored in one of two layouts:

- v1, `{"event":<canonical body>,"hash":"<64 hex>","id":"<36-char uuid>"}` exactly (keys
  sorted, like the body). `stamp` writes it; the memory store keeps it; exports, audits and
  the change feed read it. A v1 payload always starts with `{`.
- v2, written by the durable stores (`compact`, in their worker threads) for about a quarter of
  the bytes: `\x01` (the version), the 32 raw bytes of the hash, then the canonical body as
  raw deflate with the fixed preset dictionary `_ZDICT_V2`. The id is not stored: it is
  `event_id(run id, seq)`, which the engine stamps, so `expand` rebuilds the exact v1 bytes
  from the row and its place. Rows whose id is not derived (older engines, the testing aid)
  stay v1. `decode` reads both.
"""

from __future__ import annotations

import hashlib
import math
import zlib
from typing import Any
from uuid import UUID

import orjson
from pydantic import BaseModel
from rulebound.domain.errors import CorruptRun
from rulebound.domain.events import Event, parse_event

GENESIS_HASH = "0" * 64
_sha256 = hashlib.sha256
_OPTS = orjson.OPT_SORT_KEYS

V2 = b"\x01"  # the first byte of a v2 row (a v1 row starts with "{")
# The v2 preset dictionary: a placeholder body of every event type in domain/events.py, with
# the typical values the engine and decider write (timestamps, step and usage keys, reasons),
# rarest first because deflate reaches the end of a dictionary cheapest. It was built from the
# event types, not from one benchmark's runs, and it can never change once released: rows
# written with it must inflate forever (a different dictionary would be a version 3).
# tests/stores/test_compact_rows.py pins its sha256.
_ZDICT_V2 = (
    b'{"at":"2026-01-01T00:00:00.123456+00:00","limit":"cost","limit_value":1.0,"step":"step'
    b'","type":"LimitReached","used":1.0}'
    b'{"at":"2026-01-01T00:00:00.123456+00:00","timer":"timer","type":"TimerFired"}'
    b'{"at":"2026-01-01T00:00:00.123456+00:00","name":"approve","payload":{"approved":true},'
    b'"signal_id":"signal","type":"SignalReceived"}'
    b'{"at":"2026-01-01T00:00:00.123456+00:00","reason":"cancelled by request","type":"Cance'
    b'lRequested"}'
    b'{"at":"2026-01-01T00:00:00.123456+00:00","in_flight":["step"],"reason":"cancelled by r'
    b'equest","type":"RunCancelled"}'
    b'{"at":"2026-01-01T00:00:00.123456+00:00","error_type":"TimeoutError","message":"the at'
    b'tempt timed out","step":"step","type":"StepFailed","visit":1}'
    b'{"at":"2026-01-01T00:00:00.123456+00:00","attempt":1,"step":"step","type":"AttemptAban'
    b'doned","why":"engine restarted"}'
    b'{"at":"2026-01-01T00:00:00.123456+00:00","attempt":1,"error_type":"ValueError","latenc'
    b'y":0.0,"message":"error","retry_after":"2026-01-01T00:00:00.123456+00:00","retryable":'
    b'true,"step":"step","type":"AttemptFailed","usage":{"cost":0.0,"tokens_in":0,"tokens_ou'
    b't":0}}'
    b'{"at":"2026-01-01T00:00:00.123456+00:00","error_type":"routed_to_fail","reason":"step '
    b'\'step\' failed: error","type":"RunFailed"}'
    b'{"at":"2026-01-01T00:00:00.123456+00:00","definition_hash":"00000000000000000000000000'
    b'00000000000000000000000000000000000000","idempotency_key":null,"input":{"input":1},"li'
    b'mits":{"deadline":3600.0,"max_abandoned":3,"max_cost":1.0,"max_steps":100,"max_tokens"'
    b':200000},"seed":1,"traceparent":"00-00000000000000000000000000000000-0000000000000000-'
    b'01","type":"RunStarted","workflow":"workflow"}'
    b'{"at":"2026-01-01T00:00:00.123456+00:00","output":{"output":1},"reason":"step \'step\''
    b' finished the workflow","type":"RunCompleted"}'
    b'{"at":"2026-01-01T00:00:00.123456+00:00","output":{"result":1},"signal":null,"step":"s'
    b'tep","type":"StepCompleted","visit":1}'
    b'{"at":"2026-01-01T00:00:00.123456+00:00","attempt":1,"latency":0.001,"output":{"result'
    b'":1},"step":"step","type":"AttemptSucceeded","usage":{"cost":0.0,"tokens_in":0,"tokens'
    b'_out":0}}'
    b'{"at":"2026-01-01T00:00:00.123456+00:00","attempt":1,"deadline":"2026-01-01T00:00:00.1'
    b'23456+00:00","executor":"function","step":"step","type":"AttemptStarted","worker":"hos'
    b't:1234:abcdef"}'
    b'{"at":"2026-01-01T00:00:00.123456+00:00","condition":"otherwise","from_step":"step","t'
    b'o_step":"next","type":"TransitionTaken","values":{}}'
    b'{"at":"2026-01-01T00:00:00.123456+00:00","attempt":1,"item":null,"items":null,"kind":"'
    b'task","max_cost":0.0,"max_tokens":null,"not_before":"2026-01-01T00:00:00.123456+00:00"'
    b',"parent":null,"reason":"step -> next: otherwise","step":"step","type":"StepScheduled"'
    b',"visit":1}'
)
# Copied per row: loading the dictionary into a new compressor costs more than the deflate.
# An 8 KB window and memLevel 4 make the copy cheap (3.9 us a row here against 6.7 for a new
# compressor with a 32 KB window, same sizes for bodies of up to a few KB); the window is the
# writer's choice, not the format's: rows are inflated with a 32 KB window, which reads any.
_DEFLATE = zlib.compressobj(6, zlib.DEFLATED, -13, 4, zlib.Z_DEFAULT_STRATEGY, _ZDICT_V2)
_V1_HEAD = b'{"event":'
_V1_TAIL = 119  # len(',"hash":"') + 64 + len('","id":"') + 36 + len('"}')


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


def event_id(run_id: UUID | str, seq: int) -> str:
    """The id of a run's event at `seq`: the run id with its last 48 bits replaced by `seq`.

    Derived rather than random so that a v2 row need not store it (34 bytes with its key):
    unique per (run, seq) for seq < 2**48, and as cheap as a string format (the engine
    inlines it on the hot path), where a uuid5 would hash per event.
    """
    return f"{str(run_id)[:24]}{seq:012x}"


def compact(data: bytes, run_id: UUID | str, seq: int) -> bytes:
    """A v1 payload as a v2 row, or the payload unchanged unless it is exactly the v1 layout
    with a lowercase hash and the derived id (only then can `expand` rebuild the same bytes).

    About 6 us per event (the deflate): the durable stores call it in their worker threads,
    never on the event loop.
    """
    if (len(data) <= _V1_TAIL + 9 or data[:9] != _V1_HEAD
            or data[-_V1_TAIL:-110] != b',"hash":"' or data[-46:-38] != b'","id":"'
            or data[-2:] != b'"}' or data[-38:-2] != event_id(run_id, seq).encode()):
        return data
    digest = data[-110:-46]
    try:
        raw = bytes.fromhex(digest.decode("ascii"))
    except ValueError:
        return data
    if raw.hex().encode() != digest:
        return data  # an uppercase hash would come back lowercase
    deflate = _DEFLATE.copy()
    return V2 + raw + deflate.compress(data[9:-_V1_TAIL]) + deflate.flush()


def expand(data: bytes, run_id: UUID | str, seq: int) -> bytes:
    """A stored row as its v1 bytes (a v1 row is returned as it is); ValueError if a v2 row
    does not inflate cleanly. Every reader of stored bytes sees v1, whatever the row holds."""
    if data[:1] != V2:
        return data
    if len(data) < 34:
        raise ValueError("a v2 row shorter than its hash")
    inflate = zlib.decompressobj(-15, _ZDICT_V2)
    try:
        body = inflate.decompress(data[33:])
    except zlib.error as exc:
        raise ValueError(f"a v2 row does not inflate: {exc}") from None
    if not inflate.eof or inflate.unused_data:
        raise ValueError("a v2 row's body is cut short or followed by extra bytes")
    return _stored(body, data[1:33].hex(), event_id(run_id, seq))


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
    """Stored bytes (either layout) to a typed event; any failure is a `CorruptRun` naming run
    and position. A v2 row needs `run_id` and `seq`: its id is derived from them."""
    try:
        if isinstance(data, bytes) and data[:1] == V2:
            if run_id is None or seq is None:
                raise ValueError("a v2 row needs its run id and seq to be read")
            data = expand(data, run_id if isinstance(run_id, UUID) else str(run_id), seq)
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
