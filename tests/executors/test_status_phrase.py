"""A remote server's reason phrase is its own free text: a server that echoes the request's
Authorization header there must not get the API key into our failure messages."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from uuid import uuid4

import pytest
from aiohttp import web
from pydantic import BaseModel
from rulebound.adapters.executors import AnthropicMessages, HttpTool, OpenAIChat
from rulebound.engine import ExecutorError, Task

from tests import loopback

SECRET = "sk-echoed-0b5e2d-DO-NOT-LEAK"


class Label(BaseModel):
    category: str


@pytest.fixture
async def echo_base() -> AsyncIterator[str]:
    """Answers every request 401 or 503 (by path) with the Authorization (or x-api-key)
    header as the reason phrase, as a careless proxy might."""

    async def echo(request: web.Request) -> web.Response:
        given = request.headers.get("Authorization") or request.headers.get("x-api-key", "")
        status = 503 if "/busy/" in request.path else 401
        return web.Response(status=status, reason=f"Nope {given}", text="{}",
                            headers={"Retry-After": "1"})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    runner = await loopback.serve(app)
    yield loopback.base_url(runner)
    await runner.cleanup()


def _task() -> Task:
    return Task(run_id=uuid4(), step="s", attempt=1, idempotency_key="r:s:1",
                input={"text": "hi", "id": "1"}, config={"prompt": "Say: {text}"},
                output_schema=Label, timeout=5.0,
                deadline=datetime.now(UTC) + timedelta(seconds=5), max_tokens=1000,
                max_cost=1.0)


@pytest.mark.parametrize(("where", "status", "phrase"), [
    ("", 401, "401 Unauthorized"), ("/busy", 503, "503 Service Unavailable")])
@pytest.mark.parametrize("kind", ["openai", "anthropic", "tool"])
async def test_the_standard_phrase_is_used_never_the_servers_reason(
    echo_base: str, caplog: pytest.LogCaptureFixture, kind: str, where: str, status: int,
    phrase: str,
) -> None:
    caplog.set_level(logging.DEBUG)
    base = echo_base + where
    executor: OpenAIChat | AnthropicMessages | HttpTool
    if kind == "openai":
        executor = OpenAIChat("gpt-4o-mini", base_url=f"{base}/v1", api_key=lambda: SECRET)
    elif kind == "anthropic":
        executor = AnthropicMessages("claude-haiku-4-5", base_url=base, api_key=lambda: SECRET)
    else:
        executor = HttpTool("GET", f"{base}/customers/{{id}}", allow=["127.0.0.1"],
                            headers={"Authorization": f"Bearer {SECRET}"})
    try:
        with pytest.raises(ExecutorError) as caught:
            await executor(_task())
    finally:
        await executor.close()
    message = str(caught.value)
    assert phrase in message
    assert "Nope" not in message  # nothing of the server's own phrase
    for text in (message, repr(caught.value), caplog.text):
        assert SECRET not in text
    assert caught.value.retryable == (status == 503)
