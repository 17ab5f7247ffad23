"""The HTTP API over aiohttp: start, follow, signal, cancel and explain runs.

Every error a client can cause is a 4xx with a JSON body naming the problem; nothing is
appended for a rejected request (validation happens before the engine is asked); a bug is a
500 with a generic message, the traceback stays in the server log.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import os
import re
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, TypeVar
from uuid import UUID

import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from pydantic import BaseModel, ValidationError
from rulebound.domain.definitions import WaitForSignal
from rulebound.domain.errors import (
    CorruptRun,
    DefinitionError,
    InvalidEvent,
    RuleboundError,
    RunNotFound,
)
from rulebound.engine import Engine
from rulebound.engine.engine import EngineState
from rulebound.engine.errors import (
    Conflict,
    EngineClosed,
    IdempotencyConflict,
    InvalidInput,
    Overloaded,
    RunTerminal,
    WorkflowNotFound,
)
from rulebound.engine.executor import ExecutorError, PermanentError, RetryableError
from rulebound.engine.registry import AppLoadError
from rulebound.engine.store import ConcurrencyConflict, StoreError, StoreUnavailable
from rulebound.engine.testing import InvariantViolated
from rulebound.engine.tracing import trace_context

from . import models
from .console import add_console
from .memory import GiveBack
from .openapi import document

log = logging.getLogger("rulebound.http")
MAX_BODY = 1024 * 1024
KEEPALIVE = 15.0  # seconds between `: keepalive` comments on an idle event stream
SHUTDOWN_TIMEOUT = 5.0  # seconds a stopping server waits for requests still in flight
MAX_PENDING_STARTS = 256  # starts handed to the engine and not yet answered, before 503
STORE_RETRY_AFTER = 2  # seconds a client is told to wait when the store does not answer
READY_RETRY_AFTER = 1  # seconds a client is told to wait while the engine opens
VERSION_COUNT_CAP = 5_000  # runs read to count a workflow's runs per version
ENGINE: web.AppKey[Engine] = web.AppKey("engine", Engine)
GIVE_BACK: web.AppKey[GiveBack] = web.AppKey("give_back", GiveBack)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_STATUSES = models.RUN_STATUSES
M = TypeVar("M", bound=BaseModel)


class ApiError(Exception):
    def __init__(self, status: int, kind: str, message: str,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.kind, self.message = status, kind, message
        self.headers = headers or {}


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(data, default=str), status=status,
                        content_type="application/json", headers=headers)


def _error(status: int, kind: str, message: str,
           headers: dict[str, str] | None = None) -> web.Response:
    # text from a request (a header, a path) may hold lone surrogates: never let them fail
    # the answer
    message = message.encode("utf-8", "replace").decode("utf-8")
    return _json({"error": {"type": kind, "message": message}}, status, headers)


class Status:
    """How one error class is answered: status, error type, whether its message is shown
    (False: a generic one is, and the error is logged with its traceback), extra headers."""

    def __init__(self, status: int, kind: str, *, show: bool = True,
                 headers: Mapping[str, str] | None = None) -> None:
        self.status, self.kind, self.show = status, kind, show
        self.headers = dict(headers or {})


# Every public error class, answered deliberately (tests/http pins that none is missing). A
# subclass not listed here is answered as its nearest listed base class.
ERROR_STATUS: dict[type[Exception], Status] = {
    RuleboundError: Status(400, "bad_request"),
    WorkflowNotFound: Status(404, "not_found"),
    RunNotFound: Status(404, "not_found"),
    InvalidInput: Status(422, "invalid_input"),
    RunTerminal: Status(409, "run_ended"),
    Conflict: Status(409, "conflict"),
    ConcurrencyConflict: Status(409, "conflict"),
    Overloaded: Status(503, "overloaded"),  # Retry-After from the error
    EngineClosed: Status(503, "unavailable", headers={"Retry-After": "5"}),
    StoreError: Status(503, "store_unavailable", show=False,
                       headers={"Retry-After": str(STORE_RETRY_AFTER)}),
    StoreUnavailable: Status(503, "store_unavailable", show=False,
                             headers={"Retry-After": str(STORE_RETRY_AFTER)}),
    IdempotencyConflict: Status(409, "idempotency_conflict"),
    CorruptRun: Status(500, "corrupt_run"),
    # not a client's doing: a bug or the server's own configuration
    DefinitionError: Status(500, "internal", show=False),
    InvalidEvent: Status(500, "internal", show=False),
    AppLoadError: Status(500, "internal", show=False),
    InvariantViolated: Status(500, "internal", show=False),
    ExecutorError: Status(500, "internal", show=False),
    RetryableError: Status(500, "internal", show=False),
    PermanentError: Status(500, "internal", show=False),
}
_GENERIC = {500: "internal error; see the server log",
            503: "the event store is not answering; try again shortly"}


def _ownership_lines(engine: Engine) -> list[str]:
    """Shards, renewals and takeovers, for an engine on a store shared by several."""
    own = engine.ownership
    if own is None:
        return []
    return [
        "# HELP rulebound_shards_owned Shards (and so runs) this engine decides for.",
        "# TYPE rulebound_shards_owned gauge",
        f"rulebound_shards_owned {len(own.held)}",
        "# HELP rulebound_engines Engines sharing the store, as of the last lease renewal.",
        "# TYPE rulebound_engines gauge",
        f"rulebound_engines {own.engines}",
        "# HELP rulebound_lease_renewals_total Successful lease cycles.",
        "# TYPE rulebound_lease_renewals_total counter",
        f"rulebound_lease_renewals_total {own.renewals}",
        "# HELP rulebound_takeovers_total Shards this engine took (each at a new epoch).",
        "# TYPE rulebound_takeovers_total counter",
        f"rulebound_takeovers_total {own.takeovers}",
        "# HELP rulebound_self_fenced_total Times this engine gave up its shards for want of "
        "a lease renewal.",
        "# TYPE rulebound_self_fenced_total counter",
        f"rulebound_self_fenced_total {own.self_fenced}",
        "# HELP rulebound_fenced_writes_total Writes refused because another engine had "
        "taken the run's shard.",
        "# TYPE rulebound_fenced_writes_total counter",
        f"rulebound_fenced_writes_total {engine.storage.fenced}",
    ]


def _retention_lines(engine: Engine) -> list[str]:
    """Retention passes and the runs they moved out of the store (Engine(retention=...))."""
    retainer = engine.retainer
    if retainer is None:
        return []
    return [
        "# HELP rulebound_retention_passes_total Retention passes finished.",
        "# TYPE rulebound_retention_passes_total counter",
        f"rulebound_retention_passes_total {retainer.passes}",
        "# HELP rulebound_archived_runs_total Ended runs archived to verified files and "
        "removed from the store by retention.",
        "# TYPE rulebound_archived_runs_total counter",
        f"rulebound_archived_runs_total {retainer.archived}",
    ]


def status_of(exc: BaseException) -> Status | None:
    """The answer for an error: the entry of its class or nearest listed base (None: a bug)."""
    for cls in type(exc).__mro__:
        found = ERROR_STATUS.get(cls)
        if found is not None:
            return found
    return None


def _map(exc: Exception, where: str) -> ApiError:
    """Our typed errors to status codes; messages are ours, never a traceback."""
    if isinstance(exc, ApiError):
        return exc
    found = status_of(exc)
    if found is None:
        raise exc
    headers = dict(found.headers)
    if isinstance(exc, Overloaded):
        headers["Retry-After"] = str(max(1, round(exc.retry_after)))
    if found.show:
        return ApiError(found.status, found.kind, str(exc), headers)
    if isinstance(exc, StoreError):  # an outage, not a bug: one line, no traceback
        log.warning("%s: the store failed: %s: %s", where, type(exc).__name__, exc)
    else:
        log.error("%s: %s", where, type(exc).__name__, exc_info=exc)
    return ApiError(found.status, found.kind, _GENERIC.get(found.status, "internal error"),
                    headers)


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        if exc.status == 413:
            return _error(413, "too_large", f"the body is larger than {MAX_BODY} bytes")
        return _error(exc.status, exc.reason.lower().replace(" ", "_"), exc.reason,
                      {k: v for k, v in exc.headers.items() if k in ("Allow",)})
    except HttpProcessingError as exc:  # aiohttp's parser, on a body it cannot read
        return _error(exc.code if 400 <= exc.code < 500 else 400, "bad_request",
                      f"the request cannot be parsed: {exc.message}")
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        try:
            api = _map(exc, f"{request.method} {request.path}")
        except Exception:
            log.exception("unhandled error on %s %s", request.method, request.path)
            return _error(500, "internal", "internal error; see the server log")
        return _error(api.status, api.kind, api.message, api.headers)


def _auth_middleware(token: str | None) -> Any:
    expected = f"Bearer {token}".encode() if token else None

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if expected is not None and request.path.startswith("/v1"):
            # surrogateescape gives back the bytes that came (a header that is not UTF-8
            # is simply not the token)
            try:
                given = request.headers.get("Authorization", "").encode("utf-8",
                                                                        "surrogateescape")
            except UnicodeEncodeError:
                given = b""
            if not hmac.compare_digest(given, expected):
                raise ApiError(401, "unauthorized", "a valid bearer token is required",
                               {"WWW-Authenticate": "Bearer"})
        return await handler(request)

    return auth


# Why the engine does not take requests yet (or any more), by its state.
_NOT_READY = {EngineState.NEW: "starting",
              EngineState.OPENING: "opening the store and recovering runs",
              EngineState.CLOSING: "shutting down",
              EngineState.CLOSED: "stopped"}
_OPENING = (EngineState.NEW, EngineState.OPENING)


def not_ready(engine: Engine) -> str | None:
    """Why the run API cannot be answered now, or None once the engine is open (its open()
    has recovered every unfinished run, so due work is already under way)."""
    return _NOT_READY.get(engine.state)


def _ready_middleware(engine: Engine) -> Any:
    """`rulebound serve` listens before the engine opens, so that /healthz answers at once;
    until the engine is open the run API says so (503, Retry-After) instead of hanging. An
    engine closing or closed answers as before (EngineClosed: 503 `unavailable`)."""

    @web.middleware
    async def ready(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith("/v1") and engine.state in _OPENING:
            reason = not_ready(engine)
            if reason is not None:
                raise ApiError(503, "not_ready", f"the engine is not ready: {reason}; retry "
                               "after Retry-After (GET /readyz says when it is ready)",
                               {"Retry-After": str(READY_RETRY_AFTER)})
        return await handler(request)

    return ready


_LONG_NUMBER = re.compile(rb"\d{19,}")  # may not fit 64 bits (a cheap screen, then exact)
_INT_RANGE = (-(2**63), 2**64 - 1)  # what orjson keeps exact; beyond it parses as a float


def _exact_int(text: str) -> int:
    value = int(text)
    if not _INT_RANGE[0] <= value <= _INT_RANGE[1]:
        shown = text if len(text) <= 24 else text[:21] + "..."
        raise ApiError(400, "bad_request", f"the body holds the integer {shown}, beyond 64 "
                       "bits: it cannot be kept exactly; send it as a string")
    return value


def parse_json(raw: bytes) -> Any:
    """A request body as JSON. Integers beyond 64 bits are refused (orjson would turn them
    into floats, silently changing the number), never stored approximately."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, "malformed_json", f"the body is not valid JSON: {exc}") from None
    if _LONG_NUMBER.search(raw):  # rare: read the numbers again, exactly, to check them
        with contextlib.suppress(RecursionError):  # deeper than the check goes: keep it
            json.loads(raw, parse_int=_exact_int)
    return value


async def _body(request: web.Request, *, required: bool) -> Any:
    raw = await request.read()
    if not raw:
        if required:
            raise ApiError(400, "bad_request", "a JSON body is required")
        return None
    ctype = request.content_type
    if ctype not in ("application/json", "application/octet-stream", "") and not (
        ctype.endswith("+json")
    ):
        raise ApiError(415, "unsupported_media_type", f"expected application/json, got {ctype}")
    return parse_json(raw)


def _problem(exc: ValidationError, where: str) -> str:
    """The first problems of a validation, named by where they are (one line)."""
    parts = []
    for err in exc.errors(include_url=False)[:3]:
        loc = ".".join(str(x) for x in err["loc"])
        if err["type"] == "extra_forbidden":
            parts.append(f"unknown field {loc!r}")
        else:
            parts.append(f"{where} {loc!r}: {err['msg']}" if loc else f"{where}: {err['msg']}")
    more = f" (+{exc.error_count() - 3} more)" if exc.error_count() > 3 else ""
    return "; ".join(parts) + more


def check(model: type[M], data: Any, where: str) -> M:
    """Validate request data with its model; a failure is a 400 naming the field."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ApiError(400, "bad_request", _problem(exc, where)) from None


def _headers(request: web.Request, model: type[M]) -> M:
    fields = [f.alias or name for name, f in model.model_fields.items()]
    return check(model, {k: request.headers[k] for k in fields if k in request.headers},
                 "header")


def _query(request: web.Request, model: type[M]) -> M:
    return check(model, {k: request.query[k] for k in request.query}, "query parameter")


def _path(request: web.Request, model: type[M]) -> M:
    """Path parameters; a run id that is not a UUID names no run (404)."""
    data = dict(request.match_info)
    if "run_id" in data:
        _run_id(request)
    return check(model, data, "path parameter")


def _answer(model: type[BaseModel], data: Any, status: int = 200,
            headers: dict[str, str] | None = None) -> web.Response:
    """An answer, built through its model (the one /openapi.json documents)."""
    return web.Response(body=model.model_validate(data).model_dump_json().encode(),
                        status=status, content_type="application/json", headers=headers)


def _run_id(request: web.Request) -> UUID:
    raw = request.match_info["run_id"]
    try:
        return UUID(raw)
    except ValueError:
        shown = raw.encode("utf-8", "replace").decode("utf-8")
        raise ApiError(404, "not_found", f"{shown!r} is not a run id") from None


class Api:
    def __init__(self, engine: Engine, token: str | None, keepalive: float = KEEPALIVE,
                 max_pending_starts: int = MAX_PENDING_STARTS) -> None:
        self.engine = engine
        self.token = token
        self.keepalive = keepalive
        self.max_pending_starts = max_pending_starts
        self.pending_starts = 0  # POST /v1/runs handed to the engine and not yet answered
        self.started = time.time()
        self.closing = asyncio.Event()  # set on shutdown: open event streams end

    async def on_shutdown(self, app: web.Application) -> None:
        """End every open event stream, so shutdown does not wait on followers (a stream
        of a waiting run would otherwise stay open for as long as keepalives go through)."""
        self.closing.set()

    async def _live(self, run_id: UUID, call: Awaitable[None]) -> None:
        """A signal or cancel; a held run is told apart from one that has ended."""
        try:
            await call
        except RunTerminal as exc:
            view = await self.engine.get(run_id)
            if view.status == "held":
                raise ApiError(409, "run_held", f"{view.reason or exc}; it takes no signals "
                               "or cancellations until that version is registered") from None
            raise

    def overloaded(self) -> bool:
        """Decided before anything is read or queued, so a refusal costs next to nothing."""
        return self.engine.saturation >= 1.0 or self.pending_starts >= self.max_pending_starts

    async def start_run(self, request: web.Request) -> web.Response:
        if self.overloaded():
            raise ApiError(503, "overloaded", "too many runs in flight; try again later",
                           {"Retry-After": "1"})
        headers = _headers(request, models.StartRunHeaders)
        header = headers.idempotency_key
        body = await _body(request, required=True)
        if not isinstance(body, dict):
            raise ApiError(400, "bad_request", "the body must be a JSON object")
        start = check(models.StartRun, body, "field")
        if header is not None and start.idempotency_key not in (None, header):
            raise ApiError(400, "bad_request", "the Idempotency-Key header and the body's "
                           "idempotency_key differ; send one, or the same key in both")
        self.pending_starts += 1
        try:
            with trace_context(headers.traceparent):
                run_id, created = await self.engine.start_run(
                    start.workflow, start.input, header or start.idempotency_key)
        finally:
            self.pending_starts -= 1
        return _answer(models.Started, {"run_id": run_id}, 201 if created else 200,
                       {"Location": f"/v1/runs/{run_id}"})

    async def list_runs(self, request: web.Request) -> web.Response:
        query = _query(request, models.ListRunsQuery)
        rows = await self.engine.runs(status=query.status, workflow=query.workflow,
                                      limit=query.limit + 1, offset=query.offset)
        more = len(rows) > query.limit
        rows = rows[:query.limit]
        details: list[dict[str, Any] | None] = [None] * len(rows)
        if query.detail == "1":
            details = list(await asyncio.gather(*(self._detail(r.run_id) for r in rows)))
        return _answer(models.RunList, {
            "runs": [{"run_id": r.run_id, "workflow": r.workflow, "status": r.status,
                      "version": r.version, "created_at": r.created_at,
                      "updated_at": r.updated_at, "detail": d}
                     for r, d in zip(rows, details, strict=True)],
            "next_offset": query.offset + query.limit if more else None})

    async def _detail(self, run_id: UUID) -> dict[str, Any] | None:
        """A row's detail (None for a run whose log cannot be folded: it is listed, not read)."""
        try:
            view = await self.engine.get(run_id)
        except (CorruptRun, RunNotFound):
            return None
        return {"definition_hash": view.definition_hash, "usage": view.usage,
                "attempts": view.attempts, "retries": view.retries,
                "steps_taken": view.steps_taken, "waiting_for": list(view.waiting_for),
                "started_at": view.started_at, "reason": view.reason,
                "ended_at": view.updated_at if view.terminal else None}

    async def get_run(self, request: web.Request) -> web.Response:
        run_id = _path(request, models.RunPath).run_id
        return _answer(models.Run, (await self.engine.get(run_id)).to_dict())

    async def events(self, request: web.Request) -> web.StreamResponse:
        run_id = _path(request, models.RunPath).run_id
        query = _query(request, models.EventsQuery)
        last = _headers(request, models.EventsHeaders).last_event_id
        after = max(query.after, last or 0)
        if query.follow == "0":
            events = await self.engine.events(run_id, after=after) if after else (
                await self.engine.events(run_id))
            if not events:
                await self.engine.get(run_id)  # nothing after `after`, or no such run (404)
            return _json([{"seq": after + i, **e.model_dump(mode="json")}
                          for i, e in enumerate(events, start=1)])  # positions have no gaps
        await self.engine.get(run_id)  # 404 before the stream starts
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                               "Cache-Control": "no-cache"})
        await response.prepare(request)
        try:
            await self._stream(response, run_id, after)
            await response.write_eof()
        except ConnectionError:  # the client went away: not an error, nothing to answer
            log.debug("event stream of run %s: the client went away", run_id)
        return response  # aiohttp notices the closed connection and drops it quietly

    async def _stream(self, response: web.StreamResponse, run_id: UUID, after: int) -> None:
        """Write events as they come; on a quiet stream, a keepalive comment every
        `self.keepalive` seconds (which is also how a vanished client is noticed)."""
        events = self.engine.follow(run_id, after=after)
        pending: asyncio.Task[Any] | None = None
        closing = asyncio.ensure_future(self.closing.wait())
        try:
            while True:
                if pending is None:
                    pending = asyncio.ensure_future(anext(events))
                done, _ = await asyncio.wait({pending, closing}, timeout=self.keepalive,
                                             return_when=asyncio.FIRST_COMPLETED)
                if closing in done:  # the server is stopping: end the stream cleanly
                    return
                if not done:
                    await response.write(b": keepalive\n\n")
                    continue
                task, pending = pending, None
                try:
                    seq, event = task.result()  # seq: the event's stored position
                except StopAsyncIteration:
                    return
                data = orjson.dumps({"seq": seq, **event.model_dump(mode="json")})
                await response.write(b"id: %d\nevent: %s\ndata: %s\n\n" % (
                    seq, event.type.encode(), data))
        finally:
            closing.cancel()
            if pending is not None:  # stop the watcher (it unregisters from the run)
                pending.cancel()
                await asyncio.gather(pending, return_exceptions=True)
            await events.aclose()

    async def explain(self, request: web.Request) -> web.Response:
        text = await self.engine.explain(_path(request, models.RunPath).run_id)
        return web.Response(text=text, content_type="text/plain")

    async def signal(self, request: web.Request) -> web.Response:
        path = _path(request, models.SignalPath)
        key = _headers(request, models.SignalHeaders).idempotency_key
        payload = await _body(request, required=False)
        await self._live(path.run_id, self.engine.signal(path.run_id, path.name, payload,
                                                         id=key))
        return _answer(models.Accepted, {"run_id": path.run_id}, 202)

    async def cancel(self, request: web.Request) -> web.Response:
        run_id = _path(request, models.RunPath).run_id
        body = await _body(request, required=False)
        reason = "cancelled over HTTP"
        if body is not None:
            if not isinstance(body, dict):
                raise ApiError(400, "bad_request", "the body must be a JSON object")
            reason = check(models.Cancel, body, "field").reason or reason
        await self._live(run_id, self.engine.cancel(run_id, reason))
        return _answer(models.Accepted, {"run_id": run_id}, 202)

    async def workflows(self, request: web.Request) -> web.Response:
        registry = self.engine.registry
        return _answer(models.WorkflowList, {"workflows": [
            {"name": name, "latest": registry.latest(name).hash,
             "versions": [w.hash for w in registry.versions(name)],
             "description": registry.latest(name).description}
            for name in registry.names()]})

    async def workflow(self, request: web.Request) -> web.Response:
        registry = self.engine.registry
        name = _path(request, models.WorkflowPath).name
        version = _query(request, models.WorkflowQuery).version
        wf = registry.latest(name)
        if version is not None:
            found = registry.by_hash(version)
            if found is None or found.name != name:
                raise ApiError(404, "not_found", f"workflow {name!r} has no registered "
                               f"version {version[:64]!r}")
            wf = found
        graph = wf.graph()
        for node in graph["nodes"]:  # what a signal must carry: the console builds its form
            if node.get("kind") == "signal":
                step = wf.step(node["id"])
                output = step.output if isinstance(step, WaitForSignal) else None
                node["schema"] = None if output is None else output.model_json_schema()
        return _answer(models.WorkflowGraph, {**graph, "mermaid": wf.mermaid()})

    async def versions(self, request: web.Request) -> web.Response:
        """Each registered version of a workflow and how many runs started on it (counted
        over the newest VERSION_COUNT_CAP runs of the workflow)."""
        registry = self.engine.registry
        name = _path(request, models.WorkflowPath).name
        known = registry.versions(name) or [registry.latest(name)]  # 404 if unknown
        counts: dict[str, int] = {}
        counted, offset, page = 0, 0, 200
        while counted < VERSION_COUNT_CAP:
            rows = await self.engine.runs(workflow=name, limit=page, offset=offset)
            for detail in await asyncio.gather(*(self._detail(r.run_id) for r in rows)):
                if detail is not None:
                    counts[detail["definition_hash"]] = counts.get(
                        detail["definition_hash"], 0) + 1
            counted += len(rows)
            offset += page
            if len(rows) < page:
                break
        more = bool(await self.engine.runs(workflow=name, limit=1, offset=counted))
        latest = registry.latest(name).hash
        return _answer(models.WorkflowVersions, {
            "name": name, "counted": counted, "complete": not more,
            "versions": [{"hash": w.hash, "version": w.version, "latest": w.hash == latest,
                          "runs": counts.pop(w.hash, 0)} for w in reversed(known)],
            "other_runs": sum(counts.values())})

    async def export(self, request: web.Request) -> web.Response:
        """The run's export, as `rulebound export` writes it (JSON lines and a manifest)."""
        from rulebound.engine.audit import export_records

        run_id = _path(request, models.RunPath).run_id
        records = await self.engine.storage.read(run_id, 0)
        if not records:
            raise ApiError(404, "not_found", f"no run {run_id}")
        lines = export_records(str(run_id), records)
        body = b"".join(orjson.dumps(line, option=orjson.OPT_SORT_KEYS) + b"\n"
                        for line in lines)
        return web.Response(body=body, content_type="application/x-ndjson", headers={
            "Content-Disposition": f'attachment; filename="run-{run_id}.jsonl"'})

    async def verify(self, request: web.Request) -> web.Response:
        """`rulebound replay --verify` over the run's stored events."""
        from rulebound.engine.audit import record_lines, verify_lines

        run_id = _path(request, models.RunPath).run_id
        records = await self.engine.storage.read(run_id, 0)
        if not records:
            raise ApiError(404, "not_found", f"no run {run_id}")
        registry = self.engine.registry

        def find(definition_hash: str, name: str) -> Any:
            found = registry.by_hash(definition_hash)
            if found is None and name in registry.names():
                found = registry.latest(name)
            return found

        report = await asyncio.to_thread(verify_lines, record_lines(str(run_id), records),
                                         find, require_manifest=False)
        verdict = {0: "OK", 2: "FAILED", 3: "NOTICE", 4: "UNCHECKED"}.get(report.exit_code,
                                                                         "FAILED")
        return _answer(models.Verification, {
            "run_id": run_id, "verdict": verdict, "exit_code": report.exit_code,
            "events": report.events or len(records), "head_hash": report.head_hash,
            "status": report.status, "decisions_checked": report.decisions_checked,
            "findings": [str(f) for f in report.findings],
            "notices": [str(f) for f in report.notices]})

    async def health(self, request: web.Request) -> web.Response:
        return _answer(models.Health, {"active_runs": self.engine.active_runs,
                                       "uptime_s": round(time.time() - self.started, 3)})

    async def ready(self, request: web.Request) -> web.Response:
        """200 once the engine is open and has recovered its runs; 503 until then (and while
        it shuts down), naming what it waits for: for load balancers and orchestrators."""
        reason = not_ready(self.engine)
        return _answer(models.Readiness, {"ready": reason is None, "reason": reason},
                       status=200 if reason is None else 503,
                       headers=None if reason is None else {
                           "Retry-After": str(READY_RETRY_AFTER)})

    async def openapi(self, request: web.Request) -> web.Response:
        return _json(document(security=self.token is not None))

    async def metrics(self, request: web.Request) -> web.Response:
        m, engine = self.engine.metrics, self.engine
        lines: list[str] = []
        try:  # the read model lives in the store: during an outage, the rest still answers
            counts = None if not_ready(engine) else await engine.count_runs()
        except StoreError:
            counts = None
        if counts is not None:
            lines += ["# HELP rulebound_runs Runs by status (read model).",
                      "# TYPE rulebound_runs gauge"]
            for status in _STATUSES:
                lines.append(f'rulebound_runs{{status="{status}"}} {counts.get(status, 0)}')
        lines += [
            "# HELP rulebound_ready Whether the engine is open and takes requests (/readyz).",
            "# TYPE rulebound_ready gauge",
            f"rulebound_ready {int(not_ready(engine) is None)}",
            "# HELP rulebound_store_up Whether the event store answered this scrape.",
            "# TYPE rulebound_store_up gauge",
            f"rulebound_store_up {int(counts is not None)}",
            "# HELP rulebound_active_runs Runs in flight in this engine.",
            "# TYPE rulebound_active_runs gauge",
            f"rulebound_active_runs {engine.active_runs}",
            "# HELP rulebound_attempts_in_flight Attempts whose executor is running now.",
            "# TYPE rulebound_attempts_in_flight gauge",
            f"rulebound_attempts_in_flight {engine.attempts_in_flight}",
            "# HELP rulebound_results_pending Results kept while the store does not answer.",
            "# TYPE rulebound_results_pending gauge",
            f"rulebound_results_pending {engine.results_pending}",
            "# HELP rulebound_quarantined_runs Runs whose log cannot be folded (see the log).",
            "# TYPE rulebound_quarantined_runs gauge",
            f"rulebound_quarantined_runs {len(engine.quarantined)}",
            *([] if not_ready(engine) else _ownership_lines(engine)),
            *_retention_lines(engine),
            *(give.metric_lines() if (give := request.app.get(GIVE_BACK)) else []),
            "# HELP rulebound_followers Callers following live runs' events.",
            "# TYPE rulebound_followers gauge",
            f"rulebound_followers {engine.followers}",
            "# HELP rulebound_attempts_total Attempts that reported a result.",
            "# TYPE rulebound_attempts_total counter",
            f"rulebound_attempts_total {m.attempts}",
            "# HELP rulebound_attempts_failed_total Attempts that failed.",
            "# TYPE rulebound_attempts_failed_total counter",
            f"rulebound_attempts_failed_total {m.attempts_failed}",
            "# HELP rulebound_retries_total Retries scheduled.",
            "# TYPE rulebound_retries_total counter",
            f"rulebound_retries_total {m.retries}",
            "# HELP rulebound_cost_usd_total Cost reported by executors.",
            "# TYPE rulebound_cost_usd_total counter",
            f"rulebound_cost_usd_total {m.cost:.6f}",
            "# HELP rulebound_tokens_total Tokens reported by executors.",
            "# TYPE rulebound_tokens_total counter",
            f"rulebound_tokens_total {m.tokens}",
            "# HELP rulebound_commits_total Event appends (each one transaction or less).",
            "# TYPE rulebound_commits_total counter",
            f"rulebound_commits_total {m.commits}",
            "# HELP rulebound_grant_overruns_total Attempts that reported more tokens or cost "
            "than their grant.",
            "# TYPE rulebound_grant_overruns_total counter",
            f"rulebound_grant_overruns_total {m.grant_overruns}",
            "# HELP rulebound_attempt_latency_seconds Executor latency per attempt.",
            "# TYPE rulebound_attempt_latency_seconds histogram",
            *m.latency.lines("rulebound_attempt_latency_seconds"),
            "# HELP rulebound_event_loop_lag_seconds How late the loop runs a 100 ms timer.",
            "# TYPE rulebound_event_loop_lag_seconds histogram",
            *m.loop_lag.lines("rulebound_event_loop_lag_seconds"),
        ]
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain",
                            charset="utf-8")


async def _lag_probe(engine: Engine) -> None:
    loop = asyncio.get_running_loop()
    while True:
        before = loop.time()
        await asyncio.sleep(0.1)
        engine.metrics.loop_lag.observe(max(0.0, loop.time() - before - 0.1))


def create_app(engine: Engine, *, token: str | None = None, max_body: int = MAX_BODY,
               keepalive: float = KEEPALIVE,
               max_pending_starts: int = MAX_PENDING_STARTS,
               give_back_after: float = 0.0) -> web.Application:
    """The aiohttp application for an engine the caller opens and closes.

    The run API answers 503 `not_ready` until the engine is open (see `not_ready`); /healthz
    answers from the start and /readyz says when the engine is ready.
    `keepalive`: seconds between `: keepalive` comments on an idle event stream.
    `max_pending_starts`: starts handed to the engine and not yet answered; beyond it (or
    at the engine's max_active_runs) POST /v1/runs answers 503 at once, before reading the
    body, so that refusing stays cheap when the engine cannot keep up.
    `give_back_after`: seconds of quiet after which the process gives freed memory back to
    the system (adapters/http/memory.py); 0, the default, never: only for a process that
    is the server's own, as `rulebound serve`'s is.
    """
    give = GiveBack(engine, give_back_after) if give_back_after > 0 else None
    app = web.Application(client_max_size=max_body,
                          middlewares=[errors_middleware, _auth_middleware(token),
                                       _ready_middleware(engine),
                                       *([give.middleware()] if give else [])])
    app[ENGINE] = engine
    if give is not None:
        app[GIVE_BACK] = give
        app.cleanup_ctx.append(give.running)
    api = Api(engine, token, keepalive, max_pending_starts)
    app.router.add_post("/v1/runs", api.start_run)
    app.router.add_get("/v1/runs", api.list_runs)
    app.router.add_get("/v1/runs/{run_id}", api.get_run)
    app.router.add_get("/v1/runs/{run_id}/events", api.events)
    app.router.add_get("/v1/runs/{run_id}/explain", api.explain)
    app.router.add_post("/v1/runs/{run_id}/signals/{name}", api.signal)
    app.router.add_post("/v1/runs/{run_id}/cancel", api.cancel)
    app.router.add_get("/v1/workflows", api.workflows)
    app.router.add_get("/v1/workflows/{name}", api.workflow)
    app.router.add_get("/v1/workflows/{name}/versions", api.versions)
    app.router.add_get("/v1/runs/{run_id}/export", api.export)
    app.router.add_get("/v1/runs/{run_id}/verify", api.verify)
    app.router.add_get("/healthz", api.health)
    app.router.add_get("/readyz", api.ready)
    app.router.add_get("/metrics", api.metrics)
    app.router.add_get("/openapi.json", api.openapi)
    add_console(app)  # the web console at / (static files; it talks to /v1 like any client)

    async def lag(app: web.Application) -> Any:
        task = asyncio.create_task(_lag_probe(engine))
        yield
        task.cancel()

    app.cleanup_ctx.append(lag)
    app.on_shutdown.append(api.on_shutdown)
    return app


def is_loopback(host: str) -> bool:
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None, allow_insecure: bool = False) -> None:
    """Refuse a non-loopback address without a token (call it before opening the engine)."""
    if token is None and not is_loopback(host) and not allow_insecure:
        raise RuleboundError(
            f"refusing to serve on {host} without a token: set RULEBOUND_TOKEN, or pass "
            "--insecure-no-auth if the network is trusted")


def listen(host: str, port: int) -> socket.socket:
    """Bind and listen at once (call it before recovering runs or printing anything): a busy
    port fails here, in one clear line, and connections that arrive during recovery wait in
    the backlog instead of being refused."""
    where = f"{host}:{port}"
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise RuleboundError(f"cannot listen on {where}: {exc.strerror}") from None
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # not a busy port's
        sock.bind(addr)
        sock.listen(512)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise RuleboundError(f"cannot listen on {where}: {exc.strerror or exc}") from None
    return sock


def address(sock: socket.socket) -> str:
    """The URL a listening socket answers at (with the real port when 0 was asked for)."""
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


@contextlib.asynccontextmanager
async def serving(engine: Engine, sock: socket.socket, *, token: str | None,
                  give_back_after: float = 0.0) -> AsyncIterator[None]:
    """Answer HTTP on a listening socket inside the block; the engine need not be open yet
    (the run API says 503 not_ready until it is, /healthz answers at once). On the way out
    the socket stops accepting, open event streams end and requests in flight finish (up to
    SHUTDOWN_TIMEOUT); the caller then closes the engine, which drains running attempts.
    `give_back_after`: see create_app (`rulebound serve` passes --give-back-after)."""
    runner = web.AppRunner(create_app(engine, token=token, give_back_after=give_back_after),
                           access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT)
    tracing = None
    if os.environ.get("RULEBOUND_OTEL", "") not in ("", "0"):  # the `otel` extra, asked for
        from rulebound.adapters.otel import instrument

        tracing = instrument(engine)
    await runner.setup()
    try:
        await web.SockSite(runner, sock).start()
        log.info("listening on %s", address(sock))
        yield
    finally:
        await runner.cleanup()
        if tracing is not None:
            tracing.close()


async def serve_socket(engine: Engine, sock: socket.socket, *, token: str | None,
                       stop: asyncio.Event | None = None,
                       ready: asyncio.Event | None = None) -> None:
    """Serve on a listening socket until `stop` is set (or until cancelled); see `serving`."""
    async with serving(engine, sock, token=token):
        if ready is not None:
            ready.set()
        await (stop or asyncio.Event()).wait()


async def serve(engine: Engine, host: str, port: int, *, token: str | None,
                allow_insecure: bool = False, ready: asyncio.Event | None = None,
                stop: asyncio.Event | None = None) -> None:
    """Serve until `stop` is set or cancelled. Refuses a non-loopback address without a
    token."""
    check_bind(host, token, allow_insecure)
    sock = listen(host, port)
    try:
        await serve_socket(engine, sock, token=token, stop=stop, ready=ready)
    finally:
        sock.close()
