"""The trace context a run is started under, handed to the engine without a new argument.

A caller that traces (the HTTP server, with a request's `traceparent` header) starts the run
inside `trace_context(...)`; the engine records the value in the run's RunStarted, where a
tracer (rulebound.adapters.otel) finds it again, in this process or after a restart. Nothing
here imports OpenTelemetry.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

TRACEPARENT: ContextVar[str | None] = ContextVar("rulebound_traceparent", default=None)
_FORMAT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?$")


def parse_traceparent(value: str | None) -> str | None:
    """A W3C traceparent header, normalised to its version-00 form; None if it is not valid
    (an invalid header is ignored, as the W3C recommendation says, never an error)."""
    if not value:
        return None
    found = _FORMAT.match(value.strip().lower())
    if found is None:
        return None
    version, trace_id, span_id, flags, rest = found.groups()
    if version == "ff" or (version == "00" and rest) or set(trace_id) == {"0"} or (
            set(span_id) == {"0"}):
        return None
    return f"00-{trace_id}-{span_id}-{flags}"


@contextmanager
def trace_context(traceparent: str | None) -> Iterator[None]:
    """Runs started inside this block record `traceparent` (checked; invalid is ignored)."""
    token = TRACEPARENT.set(parse_traceparent(traceparent))
    try:
        yield
    finally:
        TRACEPARENT.reset(token)
