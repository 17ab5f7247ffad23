"""The HTTP API over aiohttp: start, follow, signal, cancel and explain runs.

Every error a client can cause is a 4xx with a JSON body naming the problem; nothing is
appended for a rejected request (validation happens before the engine is asked); a bug is a
500 with a generic message, the traceback stays in the server log.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any
from uuid import UUID

import orjson
from aiohttp import web
from rulebound.domain.errors import CorruptRun, RuleboundError, RunNotFound
from rulebound.engine import Engine
from rulebound.engine.errors import (
    EngineClosed,
    InvalidInput,
    Overloaded,
    RunTerminal,
    WorkflowNotFound,
)

from .openapi import document

log = logging.getLogger("rulebound.http")
MAX_BODY = 1024 * 1024
KEEPALIVE = 15.0  # seconds between `: keepalive` comments on an idle event stream
SHUTDOWN_TIMEOUT = 5.0  # seconds a stopping server waits for requests still in flight
ENGINE: web.AppKey[Engine] = web.AppKey("engine", Engine)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_STATUSES = ("running", "completed", "failed", "cancelled")


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
    return _json({"error": {"type": kind, "message": message}}, status, headers)


def _map(exc: Exception) -> ApiError:
    """Our typed errors to status codes; messages are ours, never a traceback."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, WorkflowNotFound | RunNotFound):
        return ApiError(404, "not_found", str(exc))
    if isinstance(exc, InvalidInput):
        return ApiError(422, "invalid_input", str(exc))
    if isinstance(exc, RunTerminal):
        return ApiError(409, "run_ended", str(exc))
    if isinstance(exc, Overloaded):
        return ApiError(503, "overloaded", str(exc),
                        {"Retry-After": str(max(1, round(exc.retry_after)))})
    if isinstance(exc, CorruptRun):
        return ApiError(500, "corrupt_run", str(exc))
    if isinstance(exc, EngineClosed):
        return ApiError(503, "unavailable", "the engine is shutting down", {"Retry-After": "5"})
    if isinstance(exc, RuleboundError):
        return ApiError(400, "bad_request", str(exc))
    raise exc


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
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        try:
            api = _map(exc)
        except Exception:
            log.exception("unhandled error on %s %s", request.method, request.path)
            return _error(500, "internal", "internal error; see the server log")
        return _error(api.status, api.kind, api.message, api.headers)


def _auth_middleware(token: str | None) -> Any:
    expected = f"Bearer {token}".encode() if token else None

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if expected is not None and request.path.startswith("/v1"):
            given = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                raise ApiError(401, "unauthorized", "a valid bearer token is required",
                               {"WWW-Authenticate": "Bearer"})
        return await handler(request)

    return auth


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
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, "malformed_json", f"the body is not valid JSON: {exc}") from None


def _run_id(request: web.Request) -> UUID:
    raw = request.match_info["run_id"]
    try:
        return UUID(raw)
    except ValueError:
        raise ApiError(404, "not_found", f"{raw!r} is not a run id") from None


def _int(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, "bad_request", f"{name} must be an integer") from None
    if not low <= value <= high:
        raise ApiError(400, "bad_request", f"{name} must be between {low} and {high}")
    return value


class Api:
    def __init__(self, engine: Engine, token: str | None, keepalive: float = KEEPALIVE) -> None:
        self.engine = engine
        self.token = token
        self.keepalive = keepalive
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

    async def start_run(self, request: web.Request) -> web.Response:
        body = await _body(request, required=True)
        if not isinstance(body, dict):
            raise ApiError(400, "bad_request", "the body must be a JSON object")
        unknown = set(body) - {"workflow", "input", "idempotency_key"}
        if unknown:
            raise ApiError(400, "bad_request", f"unknown fields: {sorted(unknown)}")
        workflow = body.get("workflow")
        if not isinstance(workflow, str) or not workflow:
            raise ApiError(400, "bad_request", "'workflow' must be a non-empty string")
        key = request.headers.get("Idempotency-Key") or body.get("idempotency_key")
        if key is not None and (not isinstance(key, str) or not 0 < len(key) <= 200):
            raise ApiError(400, "bad_request", "an idempotency key is 1 to 200 characters")
        if self.engine.saturation >= 1.0:
            raise ApiError(503, "overloaded", "too many runs in flight; try again later",
                           {"Retry-After": "1"})
        run_id, created = await self.engine.start_run(workflow, body.get("input"), key)
        return _json({"run_id": str(run_id), "status": "running"}, 201 if created else 200,
                     {"Location": f"/v1/runs/{run_id}"})

    async def list_runs(self, request: web.Request) -> web.Response:
        status = request.query.get("status")
        if status is not None and status not in _STATUSES:
            raise ApiError(400, "bad_request", f"status must be one of {list(_STATUSES)}")
        limit = _int(request, "limit", 50, 1, 1000)
        offset = _int(request, "offset", 0, 0, 10**9)
        rows = await self.engine.runs(status=status, workflow=request.query.get("workflow"),
                                      limit=limit + 1, offset=offset)
        more = len(rows) > limit
        return _json({"runs": [{"run_id": str(r.run_id), "workflow": r.workflow,
                                "status": r.status, "version": r.version,
                                "created_at": r.created_at.isoformat(),
                                "updated_at": r.updated_at.isoformat()} for r in rows[:limit]],
                      "next_offset": offset + limit if more else None})

    async def get_run(self, request: web.Request) -> web.Response:
        return _json((await self.engine.get(_run_id(request))).to_dict())

    async def events(self, request: web.Request) -> web.StreamResponse:
        run_id = _run_id(request)
        after = _int(request, "after", 0, 0, 10**12)
        last = request.headers.get("Last-Event-ID")
        if last is not None:
            try:
                seen = int(last)
            except ValueError:
                raise ApiError(400, "bad_request", "Last-Event-ID must be a number") from None
            if not 0 <= seen <= 10**12:
                raise ApiError(400, "bad_request", "Last-Event-ID must be between 0 and "
                               f"{10**12}")
            after = max(after, seen)
        follow = request.query.get("follow", "0")
        if follow not in ("0", "1"):
            raise ApiError(400, "bad_request", "follow must be 0 or 1")
        if follow == "0":
            events = await self.engine.events(run_id, after=after) if after else (
                await self.engine.events(run_id))
            if not events:
                await self.engine.get(run_id)  # nothing after `after`, or no such run (404)
            return _json([{"seq": after + i, **e.model_dump(mode="json")}
                          for i, e in enumerate(events, start=1)])
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
        events = self.engine.watch(run_id, after=after)
        pending: asyncio.Task[Any] | None = None
        closing = asyncio.ensure_future(self.closing.wait())
        seq = after
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
                    event = task.result()
                except StopAsyncIteration:
                    return
                seq += 1
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
        text = await self.engine.explain(_run_id(request))
        return web.Response(text=text, content_type="text/plain")

    async def signal(self, request: web.Request) -> web.Response:
        run_id = _run_id(request)
        name = request.match_info["name"]
        payload = await _body(request, required=False)
        await self._live(run_id, self.engine.signal(run_id, name, payload))
        return _json({"run_id": str(run_id), "status": "accepted"}, 202)

    async def cancel(self, request: web.Request) -> web.Response:
        run_id = _run_id(request)
        body = await _body(request, required=False)
        reason = "cancelled over HTTP"
        if body is not None:
            if not isinstance(body, dict) or set(body) - {"reason"} or not isinstance(
                body.get("reason", ""), str
            ):
                raise ApiError(400, "bad_request", "the body may only hold a string 'reason'")
            reason = body.get("reason") or reason
        await self._live(run_id, self.engine.cancel(run_id, reason[:1000]))
        return _json({"run_id": str(run_id), "status": "accepted"}, 202)

    async def workflows(self, request: web.Request) -> web.Response:
        registry = self.engine.registry
        return _json({"workflows": [
            {"name": name, "latest": registry.latest(name).hash,
             "versions": [w.hash for w in registry.versions(name)],
             "description": registry.latest(name).description}
            for name in registry.names()]})

    async def workflow(self, request: web.Request) -> web.Response:
        wf = self.engine.registry.latest(request.match_info["name"])
        return _json({**wf.graph(), "mermaid": wf.mermaid()})

    async def health(self, request: web.Request) -> web.Response:
        return _json({"status": "ok", "active_runs": self.engine.active_runs,
                      "uptime_s": round(time.time() - self.started, 3)})

    async def openapi(self, request: web.Request) -> web.Response:
        return _json(document(security=self.token is not None))

    async def metrics(self, request: web.Request) -> web.Response:
        m = self.engine.metrics
        counts = await self.engine.count_runs()
        lines = ["# HELP rulebound_runs Runs by status (read model).",
                 "# TYPE rulebound_runs gauge"]
        for status in _STATUSES:
            lines.append(f'rulebound_runs{{status="{status}"}} {counts.get(status, 0)}')
        lines += [
            "# HELP rulebound_active_runs Runs in flight in this engine.",
            "# TYPE rulebound_active_runs gauge",
            f"rulebound_active_runs {self.engine.active_runs}",
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
               keepalive: float = KEEPALIVE) -> web.Application:
    """The aiohttp application for an engine the caller opens and closes.

    `keepalive`: seconds between `: keepalive` comments on an idle event stream.
    """
    app = web.Application(client_max_size=max_body,
                          middlewares=[errors_middleware, _auth_middleware(token)])
    app[ENGINE] = engine
    api = Api(engine, token, keepalive)
    app.router.add_post("/v1/runs", api.start_run)
    app.router.add_get("/v1/runs", api.list_runs)
    app.router.add_get("/v1/runs/{run_id}", api.get_run)
    app.router.add_get("/v1/runs/{run_id}/events", api.events)
    app.router.add_get("/v1/runs/{run_id}/explain", api.explain)
    app.router.add_post("/v1/runs/{run_id}/signals/{name}", api.signal)
    app.router.add_post("/v1/runs/{run_id}/cancel", api.cancel)
    app.router.add_get("/v1/workflows", api.workflows)
    app.router.add_get("/v1/workflows/{name}", api.workflow)
    app.router.add_get("/healthz", api.health)
    app.router.add_get("/metrics", api.metrics)
    app.router.add_get("/openapi.json", api.openapi)

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


async def serve(engine: Engine, host: str, port: int, *, token: str | None,
                allow_insecure: bool = False, ready: asyncio.Event | None = None) -> None:
    """Serve until cancelled. Refuses a non-loopback address without a token."""
    check_bind(host, token, allow_insecure)
    runner = web.AppRunner(create_app(engine, token=token), access_log=None,
                           shutdown_timeout=SHUTDOWN_TIMEOUT)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    log.info("serving on http://%s:%s", host, port)
    if ready is not None:
        ready.set()
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
