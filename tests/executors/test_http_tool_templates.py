"""${ENV_VAR} in an HttpTool's URL and body is filled from the environment (it used to be sent
as a stray `$`), a malformed one is refused when the tool is built, and a missing one fails
the attempt naming the variable."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any
from uuid import uuid4

import pytest
from aiohttp import web
from rulebound.adapters.executors import HttpTool
from rulebound.domain.errors import DefinitionError
from rulebound.engine import ExecutorError, Task

from tests import loopback


def task(data: Any) -> Task:
    return Task(run_id=uuid4(), step="call", attempt=1, idempotency_key="r:call:1", input=data,
                config={}, output_schema=None, timeout=5, deadline=datetime.now(UTC))


@pytest.fixture
async def echo() -> AsyncIterator[str]:
    """A loopback server answering every request with what it received."""
    async def answer(request: web.Request) -> web.Response:
        body = await request.json() if request.can_read_body else None
        return web.json_response({"path": request.path, "query": dict(request.query),
                                  "body": body})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    runner = await loopback.serve(app)
    yield loopback.base_url(runner)
    await runner.cleanup()


async def test_env_placeholders_fill_the_url_and_the_body(
        echo: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CRM_KEY", "k-123")
    monkeypatch.setenv("CRM_REGION", "eu")
    http = HttpTool("POST", echo + "/${CRM_REGION}/customers/{id}?key=${CRM_KEY}",
                    body={"id": "{id}", "auth": "${CRM_KEY}", "note": "region ${CRM_REGION}!",
                          "tags": ["${CRM_REGION}", "{id}"]},
                    allow=["127.0.0.1"])
    try:
        result = await http(task({"id": 7}))
    finally:
        await http.close()
    assert result.output == {
        "path": "/eu/customers/7", "query": {"key": "k-123"},
        "body": {"id": 7, "auth": "k-123", "note": "region eu!", "tags": ["eu", 7]}}


async def test_an_input_value_is_never_read_as_a_placeholder(
        echo: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CRM_KEY", "k-123")
    http = HttpTool("POST", echo + "/c/{id}", body={"text": "{text}"}, allow=["127.0.0.1"])
    try:
        result = await http(task({"id": "${CRM_KEY}", "text": "say ${CRM_KEY}"}))
    finally:
        await http.close()
    assert result.output["path"] == "/c/${CRM_KEY}"
    assert result.output["body"] == {"text": "say ${CRM_KEY}"}


async def test_an_unset_variable_fails_the_attempt_naming_it(echo: str,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             ) -> None:
    monkeypatch.delenv("NOT_SET_ANYWHERE", raising=False)
    http = HttpTool("GET", echo + "/x?key=${NOT_SET_ANYWHERE}", allow=["127.0.0.1"])
    with pytest.raises(ExecutorError) as caught:
        await http(task({}))
    await http.close()
    assert (caught.value.message, caught.value.retryable) == (
        "the secret NOT_SET_ANYWHERE is not set", False)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"url": "https://api.example/x?key=${API KEY}"},
     "HttpTool url: '${API KEY}' is not a ${ENV_VAR} placeholder"),
    ({"url": "https://api.example/${1KEY}/x"}, "HttpTool url: '${1KEY}'"),
    ({"url": "https://api.example/x", "body": {"a": ["ok", "${oops"]}},
     "HttpTool body.a[1]: '${oops' is not"),
    ({"url": "https://api.example/x", "headers": {"Authorization": "Bearer ${}"}},
     "HttpTool header Authorization: '${}' is not"),
])
def test_a_malformed_env_placeholder_is_refused_when_the_tool_is_built(
        kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(DefinitionError) as caught:
        HttpTool("POST", **kwargs)
    assert str(caught.value).startswith(message)
