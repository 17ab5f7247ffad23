"""What every HTTP executor shares: failure classification, Retry-After, bounded reads.

Messages are built from the status and its standard phrase only (never the server's own
reason phrase, which a server may fill with the request's headers): never the URL's query or
credentials, never request headers, never repr() of aiohttp's errors (their request_info
carries the Authorization header).
"""

from __future__ import annotations

import asyncio
import email.utils
import time
from collections.abc import Callable, Hashable, Mapping
from http import HTTPStatus
from typing import Any, Self

import aiohttp
import orjson
from rulebound.engine.executor import ExecutorContext, ExecutorError, Task

DEFAULT_MAX_BYTES = 4 * 1024 * 1024


class SessionUser:
    """Executors over HTTP: the engine's shared session when run by an engine (`open`), their
    own when used standalone (`async with`). `session_key`/`session_factory` pick a
    differently configured session (one per engine per key)."""

    session_key: Hashable = "http"
    _context: ExecutorContext | None = None
    _own: aiohttp.ClientSession | None = None

    def session_factory(self) -> Callable[[], aiohttp.ClientSession] | None:
        return None

    async def open(self, context: ExecutorContext) -> None:
        self._context = context

    async def close(self) -> None:
        if self._own is not None:
            await self._own.close()
            self._own = None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _session(self) -> aiohttp.ClientSession:
        factory = self.session_factory()
        if self._context is not None:
            return self._context.http_session(self.session_key, factory)
        if self._own is None or self._own.closed:
            self._own = factory() if factory else aiohttp.ClientSession(trust_env=False)
        return self._own
DEFAULT_MAX_RETRY_AFTER = 300.0


DEADLINE_MARGIN = 0.05


def attempt_seconds(task: Task) -> float:
    """Seconds an attempt may take, all its round trips (repairs, redirects) together: the
    step's `timeout`, less a small margin (5%, at most DEADLINE_MARGIN seconds).

    Which clock. `task.deadline` is a time on the engine's injected Clock, which an executor
    cannot read: comparing it with the wall clock (as executors once did) makes every call
    time out at once, or never, under a fake clock or after a wall-clock jump. So executors
    never read the deadline. They bound an attempt by `task.timeout`, measured once, on the
    event loop's monotonic clock, by a single `asyncio.timeout` around every round of the
    attempt. The deadline, which may be earlier than the timeout (the run's own deadline), is
    the engine's to enforce: it cancels the attempt on its own clock.

    The margin lets the executor's own timeout usually fire first, so the failure it reports
    names the round that hung and carries the attempt's usage. Correctness does not depend on
    winning that race: every round's usage is added to `task.spent` as soon as it is known,
    which the engine records when it cancels the attempt itself."""
    return max(0.001, task.timeout - min(DEADLINE_MARGIN, 0.05 * max(0.0, task.timeout)))


_KINDS = {408: "timeout", 409: "conflict", 429: "rate_limited", 400: "client_error",
          401: "auth", 403: "auth", 404: "not_found", 422: "client_error"}


def retry_after(headers: Mapping[str, str], cap: float = DEFAULT_MAX_RETRY_AFTER,
                now: float | None = None) -> float | None:
    """Seconds the server asks us to wait: retry-after-ms, Retry-After seconds or HTTP date."""
    raw_ms = headers.get("retry-after-ms")
    if raw_ms is not None:
        try:
            return min(cap, max(0.0, float(raw_ms) / 1000))
        except ValueError:
            pass
    raw = headers.get("Retry-After")
    if raw is None:
        return None
    raw = raw.strip()
    try:
        return min(cap, max(0.0, float(raw)))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return min(cap, max(0.0, when.timestamp() - (now if now is not None else time.time())))


def status_phrase(status: int) -> str:
    """The standard reason phrase for `status` ("" for a code HTTP does not define).

    The phrase a server sent is never used: it is free text under the server's control, and
    a server (or a proxy) that echoes the request's Authorization header there would put the
    caller's API key into our messages, events and logs."""
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


def status_error(service: str, status: int, headers: Mapping[str, str],
                 *, cap: float = DEFAULT_MAX_RETRY_AFTER) -> ExecutorError:
    """Classify a non-2xx answer: 408, 409, 429 and 5xx retry; other 4xx do not."""
    retryable = status in (408, 409, 429) or status >= 500
    kind = _KINDS.get(status, "server_error" if status >= 500 else "client_error")
    hint = retry_after(headers, cap) if retryable else None
    return ExecutorError(f"{service} answered {status} {status_phrase(status)}".strip()[:200],
                         kind=kind, retryable=retryable, retry_after=hint)


def transport_error(service: str, exc: BaseException) -> ExecutorError:
    """A failure below HTTP: named by type only (the repr would carry request headers)."""
    if isinstance(exc, asyncio.TimeoutError | TimeoutError | aiohttp.ServerTimeoutError):
        return ExecutorError(f"{service} did not answer in time", kind="timeout",
                             retryable=True)
    if isinstance(exc, aiohttp.ClientPayloadError):
        return ExecutorError(f"{service} sent a truncated body", kind="truncated",
                             retryable=True)
    return ExecutorError(f"{service}: connection failed ({type(exc).__name__})",
                         kind="connection", retryable=True)


async def read_capped(response: aiohttp.ClientResponse, max_bytes: int, service: str) -> bytes:
    """Read at most max_bytes; a larger or never-ending body is an error, not a hang."""
    declared = response.content_length
    if declared is not None and declared > max_bytes:
        raise ExecutorError(f"{service} answered {declared} bytes, more than the cap of "
                            f"{max_bytes}", kind="too_large", retryable=False)
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = await response.content.read(64 * 1024)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > max_bytes:
            raise ExecutorError(f"{service} sent more than the cap of {max_bytes} bytes",
                                kind="too_large", retryable=False)
        chunks.append(chunk)


def parse_json(raw: bytes, service: str) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise ExecutorError(f"{service} answered with malformed JSON", kind="bad_response",
                            retryable=True) from None


def fill(template: str, values: Mapping[str, Any]) -> str:
    """Fill {name} and {name.field} placeholders from the step input (missing: left empty)."""
    out, i = [], 0
    while i < len(template):
        start = template.find("{", i)
        if start < 0:
            out.append(template[i:])
            break
        end = template.find("}", start)
        if end < 0:
            out.append(template[i:])
            break
        out.append(template[i:start])
        value: Any = values
        for part in template[start + 1:end].split("."):
            value = value.get(part) if isinstance(value, Mapping) else None
        out.append("" if value is None else (value if isinstance(value, str) else
                                             orjson.dumps(value).decode()))
        i = end + 1
    return "".join(out)
