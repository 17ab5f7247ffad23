"""A local aiohttp server that speaks the OpenAI chat-completions and Anthropic messages
protocols (as documented) and misbehaves on demand: the test sets `app["mode"]`.

Like the real services it never generates more than the request's cap (max_tokens, or
max_completion_tokens) and says so (finish_reason "length", stop_reason "max_tokens"); like
OpenAI it refuses max_tokens for reasoning models (o1/o3/o4, gpt-5). Usage is 12 prompt and
7 completion tokens unless the state sets "prompt_tokens" (a number, or "count": about one
token per four bytes of the request, as a real tokenizer would) and "completion_tokens";
"usage": False leaves usage out of the answer."""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import re
import time
from typing import Any

from aiohttp import web

MODE = web.AppKey("mode", dict)
STOPPING = web.AppKey("stopping", asyncio.Event)


async def _stall(request: web.Request, seconds: float = 5.0) -> None:
    """Hang like a slow server, but only until the server shuts down: a test's teardown
    (runner.cleanup) then ends at once instead of waiting out the sleep."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(request.app[STOPPING].wait(), seconds)


def _usage(state: dict[str, Any], body: dict[str, Any], cap_field: str) -> tuple[int, int, bool]:
    """Prompt and completion tokens for this request, the completion capped as a server does."""
    prompt = state.get("prompt_tokens", 12)
    if prompt == "count":
        sent = {k: v for k, v in body.items() if k not in ("max_tokens",
                                                           "max_completion_tokens")}
        prompt = len(json.dumps(sent)) // 4
    wanted = state.get("completion_tokens", 7)
    cap = body.get(cap_field) or body.get("max_tokens") or wanted
    return prompt, min(wanted, cap), wanted > cap


def _openai_reply(content: str, state: dict[str, Any], body: dict[str, Any]) -> dict:
    prompt_tokens, completion_tokens, cut = _usage(state, body, "max_completion_tokens")
    reply: dict[str, Any] = {
        "id": "chatcmpl-1", "object": "chat.completion", "model": "m",
        "choices": [{"index": 0, "finish_reason": "length" if cut else "stop",
                     "message": {"role": "assistant", "content": content}}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens}}
    if state.get("usage") is False:
        del reply["usage"]
    return web.json_response(reply)


async def _misbehave(request: web.Request, mode: str) -> web.StreamResponse | None:
    if mode.startswith("redirect:"):
        raise web.HTTPTemporaryRedirect(mode.removeprefix("redirect:"))
    if mode == "429":
        return web.json_response({"error": {"message": "slow down"}}, status=429,
                                 headers={"Retry-After": "7"})
    if mode == "429-date":
        when = email.utils.formatdate(time.time() + 30, usegmt=True)
        return web.json_response({"error": {}}, status=429, headers={"Retry-After": when})
    if mode == "429-ms":
        return web.json_response({"error": {}}, status=429, headers={"retry-after-ms": "1500"})
    if mode.isdigit():
        return web.json_response({"error": {"message": "no"}}, status=int(mode))
    if mode == "slow":
        await _stall(request)
    if mode == "malformed":
        return web.Response(text='{"choices": [', content_type="application/json")
    if mode == "oversized":
        return web.Response(body=b'{"x":"' + b"a" * (6 * 1024 * 1024) + b'"}',
                            content_type="application/json")
    if mode == "endless":
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        for _ in range(10_000):
            await response.write(b"a" * 65536)
        return response
    if mode == "truncated":
        response = web.StreamResponse(headers={"Content-Type": "application/json",
                                               "Content-Length": "1000"})
        await response.prepare(request)
        await response.write(b'{"choices": ')
        request.transport.close()  # type: ignore[union-attr]
        return response
    return None


async def chat(request: web.Request) -> web.StreamResponse:
    state = request.app[MODE]
    body = await request.json()
    state.setdefault("requests", []).append({"headers": dict(request.headers), "body": body})
    mode = state.get("mode", "ok")
    bad = await _misbehave(request, mode)
    if bad is not None:
        return bad
    if re.match(r"^(o\d|gpt-5)", str(body.get("model"))) and "max_tokens" in body:
        return web.json_response({"error": {
            "message": "Unsupported parameter: 'max_tokens' is not supported with this model. "
                       "Use 'max_completion_tokens' instead.", "type": "invalid_request_error",
            "param": "max_tokens", "code": "unsupported_parameter"}}, status=400)
    first = len(state["requests"]) == 1
    if mode == "invalid-then-valid" and first:
        return _openai_reply('{"category": 42}', state, body)
    if mode == "invalid-then-slow":
        if first:
            return _openai_reply('{"category": 42}', state, body)
        await _stall(request)
    if mode == "always-invalid":
        return _openai_reply("not json at all", state, body)
    if mode == "schema":  # answer with a minimal instance of the requested JSON schema
        schema = body["response_format"]["json_schema"]["schema"]
        return _openai_reply(json.dumps(_instance(schema, schema)), state, body)
    return _openai_reply(state.get("content", '{"category": "billing"}'), state, body)


async def messages(request: web.Request) -> web.StreamResponse:
    state = request.app[MODE]
    body = await request.json()
    state.setdefault("requests", []).append({"headers": dict(request.headers), "body": body})
    mode = state.get("mode", "ok")
    bad = await _misbehave(request, mode)
    if bad is not None:
        return bad
    answer: dict[str, Any] = {"category": "billing"}
    if mode == "invalid-then-slow":
        if len(state["requests"]) > 1:
            await _stall(request)
        answer = {"category": 42}
    defaults = {"prompt_tokens": 20, "completion_tokens": 9}
    tokens_in, tokens_out, cut = _usage({**defaults, **state}, body, "max_tokens")
    reply: dict[str, Any] = {
        "id": "msg_1", "type": "message", "role": "assistant", "model": "claude",
        "stop_reason": "max_tokens" if cut else "tool_use",
        "usage": {"input_tokens": tokens_in, "output_tokens": tokens_out},
        "content": [{"type": "tool_use", "id": "t1", "name": "respond", "input": answer}]}
    return web.json_response(reply)


async def tool(request: web.Request) -> web.StreamResponse:
    state = request.app[MODE]
    state.setdefault("requests", []).append({"headers": dict(request.headers),
                                             "path": request.path_qs})
    mode = state.get("mode", "ok")
    if mode.startswith("redirect:"):  # the Location sent as is, even if it is not a URL
        return web.Response(status=302, headers={"Location": mode.removeprefix("redirect:")})
    bad = await _misbehave(request, mode)
    if bad is not None:
        return bad
    return web.json_response({"customer": request.match_info.get("cid"), "tier": "gold"})


def _instance(schema: dict[str, Any], root: dict[str, Any]) -> Any:
    if "$ref" in schema:
        return _instance(root["$defs"][schema["$ref"].rsplit("/", 1)[-1]], root)
    if "enum" in schema:
        return schema["enum"][0]
    if "anyOf" in schema:
        return _instance(schema["anyOf"][0], root)
    kind = schema.get("type")
    if kind == "object":
        return {k: _instance(v, root) for k, v in schema.get("properties", {}).items()}
    return {"string": "fine", "number": 0.5, "integer": 1, "boolean": True, "array": [],
            "null": None}.get(kind)


def make_app() -> web.Application:
    app = web.Application()
    app[MODE] = {}
    app[STOPPING] = asyncio.Event()

    async def stopping(app: web.Application) -> None:  # runs before handlers are awaited
        app[STOPPING].set()

    app.on_shutdown.append(stopping)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v1/messages", messages)
    app.router.add_route("*", "/customers/{cid}", tool)
    return app
