"""A local aiohttp server that speaks the OpenAI chat-completions and Anthropic messages
protocols (as documented) and misbehaves on demand: the test sets `app["mode"]`."""

from __future__ import annotations

import asyncio
import email.utils
import time
from typing import Any

from aiohttp import web

MODE = web.AppKey("mode", dict)


def _openai_reply(content: str, prompt_tokens: int = 12, completion_tokens: int = 7) -> dict:
    return {"id": "chatcmpl-1", "object": "chat.completion", "model": "m",
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": content}}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


async def _misbehave(request: web.Request, mode: str) -> web.StreamResponse | None:
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
        await asyncio.sleep(5)
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
    state.setdefault("requests", []).append({"headers": dict(request.headers),
                                             "body": await request.json()})
    mode = state.get("mode", "ok")
    bad = await _misbehave(request, mode)
    if bad is not None:
        return bad
    if mode == "invalid-then-valid" and len(state["requests"]) == 1:
        return web.json_response(_openai_reply('{"category": 42}'))
    if mode == "always-invalid":
        return web.json_response(_openai_reply("not json at all"))
    if mode == "schema":  # answer with a minimal instance of the requested JSON schema
        import json

        schema = state["requests"][-1]["body"]["response_format"]["json_schema"]["schema"]
        return web.json_response(_openai_reply(json.dumps(_instance(schema, schema))))
    return web.json_response(_openai_reply(state.get("content", '{"category": "billing"}')))


async def messages(request: web.Request) -> web.StreamResponse:
    state = request.app[MODE]
    state.setdefault("requests", []).append({"headers": dict(request.headers),
                                             "body": await request.json()})
    mode = state.get("mode", "ok")
    bad = await _misbehave(request, mode)
    if bad is not None:
        return bad
    body: dict[str, Any] = {"id": "msg_1", "type": "message", "role": "assistant",
                            "model": "claude", "stop_reason": "tool_use",
                            "usage": {"input_tokens": 20, "output_tokens": 9},
                            "content": [{"type": "tool_use", "id": "t1", "name": "respond",
                                         "input": {"category": "billing"}}]}
    return web.json_response(body)


async def tool(request: web.Request) -> web.StreamResponse:
    state = request.app[MODE]
    state.setdefault("requests", []).append({"headers": dict(request.headers),
                                             "path": request.path_qs})
    mode = state.get("mode", "ok")
    if mode.startswith("redirect:"):
        raise web.HTTPFound(mode.removeprefix("redirect:"))
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
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v1/messages", messages)
    app.router.add_route("*", "/customers/{cid}", tool)
    return app
