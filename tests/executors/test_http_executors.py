"""Model and tool executors against a real loopback server speaking the providers' protocols."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import uuid4

import aiohttp
import pytest
from aiohttp import web
from pydantic import BaseModel
from rulebound.adapters.executors import AnthropicMessages, HttpTool, OpenAIChat
from rulebound.adapters.executors.models import estimate_tokens
from rulebound.adapters.executors.ssrf import Guard
from rulebound.engine import ExecutorError, Task

from tests import loopback

from .fake_providers import MODE, make_app

CANARY = "sk-canary-7f3a9c1e-DO-NOT-LEAK"


class Label(BaseModel):
    category: str


class Customer(BaseModel):
    customer: str
    tier: str


class Server:
    def __init__(self, app: web.Application, base: str) -> None:
        self.app, self.base = app, base

    @property
    def state(self) -> dict[str, Any]:
        return self.app[MODE]

    def mode(self, mode: str, **extra: Any) -> None:
        self.state.clear()
        self.state.update({"mode": mode, **extra})


async def _serve(host: str) -> AsyncIterator[Server]:
    """The fake providers on a loopback port, reached under `host` (another name: another
    origin)."""
    app = make_app()
    runner = await loopback.serve(app)
    yield Server(app, loopback.base_url(runner, host))
    await runner.cleanup()


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    async for running in _serve("127.0.0.1"):
        yield running


def task(data: Any = None, schema: type[BaseModel] | None = Label, timeout: float = 2.0,
         max_tokens: int | None = 300, prompt: str = "Classify: {text}",
         max_cost: float | None = 1.0, deadline: float | datetime | None = None,
         config: dict[str, Any] | None = None) -> Task:
    """deadline: seconds from now (0 is now, None is `timeout` from now), or a time on some
    other clock (a fake clock's)."""
    if not isinstance(deadline, datetime):
        deadline = datetime.now(UTC) + timedelta(
            seconds=timeout if deadline is None else deadline)
    return Task(run_id=uuid4(), step="classify", attempt=1, idempotency_key="r:classify:1",
                input=data if data is not None else {"text": "refund me"},
                config={"prompt": prompt, **(config or {})}, output_schema=schema,
                timeout=timeout, deadline=deadline, max_tokens=max_tokens, max_cost=max_cost)


def test_the_task_helper_takes_a_deadline_of_zero_as_now() -> None:
    assert task(timeout=30, deadline=0).deadline <= datetime.now(UTC)


def openai(server: Server, **kw: Any) -> OpenAIChat:
    return OpenAIChat("gpt-4o-mini", base_url=f"{server.base}/v1", api_key=lambda: CANARY,
                      **kw)


def assert_clean(exc: BaseException) -> None:
    for text in (str(exc), repr(exc), *map(str, exc.args)):
        assert CANARY not in text
        assert "Authorization" not in text


async def test_openai_structured_output_usage_and_cost(server: Server) -> None:
    server.mode("ok")
    async with openai(server) as model:
        result = await model(task())
    assert result.output == {"category": "billing"}
    assert (result.usage.tokens_in, result.usage.tokens_out) == (12, 7)
    assert result.usage.cost == pytest.approx(12 * 0.15e-6 + 7 * 0.6e-6)
    sent = server.state["requests"][0]
    assert sent["headers"]["Authorization"] == f"Bearer {CANARY}"
    body = sent["body"]
    # the grant (300) less the first round's conservative prompt estimate
    estimate = estimate_tokens({k: v for k, v in body.items() if k != "max_tokens"})
    assert body["max_tokens"] == 300 - estimate
    assert body["temperature"] == 0.0
    assert body["messages"][-1] == {"role": "user", "content": "Classify: refund me"}
    schema = body["response_format"]["json_schema"]["schema"]
    assert schema["properties"]["category"]["type"] == "string"


async def test_an_invalid_answer_is_repaired_once_and_the_repair_is_counted(
    server: Server,
) -> None:
    server.mode("invalid-then-valid")
    async with openai(server) as model:
        result = await model(task())
    assert result.output == {"category": "billing"}
    assert result.usage.tokens_in == 24  # both asks count
    second = server.state["requests"][1]["body"]["messages"]
    assert second[-2] == {"role": "assistant", "content": '{"category": 42}'}
    assert "does not match" in second[-1]["content"]


async def test_a_persistently_invalid_answer_is_a_failed_attempt_with_its_usage(
    server: Server,
) -> None:
    server.mode("always-invalid")
    async with openai(server, repairs=2) as model:
        with pytest.raises(ExecutorError) as caught:
            await model(task())
    assert caught.value.kind == "invalid_output"
    assert caught.value.usage.tokens_in == 36
    assert len(server.state["requests"]) == 3


@pytest.mark.parametrize(("mode", "kind", "retryable", "after"), [
    ("429", "rate_limited", True, 7.0), ("429-ms", "rate_limited", True, 1.5),
    ("500", "server_error", True, None), ("503", "server_error", True, None),
    ("529", "server_error", True, None), ("408", "timeout", True, None),
    ("409", "conflict", True, None), ("400", "client_error", False, None),
    ("401", "auth", False, None), ("403", "auth", False, None),
    ("404", "not_found", False, None), ("422", "client_error", False, None),
    ("malformed", "bad_response", True, None), ("slow", "timeout", True, None),
    ("oversized", "too_large", False, None), ("endless", "too_large", False, None),
    ("truncated", "truncated", True, None),
])
async def test_failures_are_classified_for_the_decider(
    server: Server, caplog: pytest.LogCaptureFixture, mode: str, kind: str, retryable: bool,
    after: float | None,
) -> None:
    server.mode(mode)
    caplog.set_level(logging.DEBUG)
    async with openai(server) as model:
        with pytest.raises(ExecutorError) as caught:
            await model(task(timeout=0.5))
    assert (caught.value.kind, caught.value.retryable) == (kind, retryable)
    assert caught.value.retry_after == after
    assert_clean(caught.value)
    assert CANARY not in caplog.text


async def test_retry_after_as_an_http_date(server: Server) -> None:
    server.mode("429-date")
    async with openai(server) as model:
        with pytest.raises(ExecutorError) as caught:
            await model(task())
    assert 25 <= caught.value.retry_after <= 31  # type: ignore[operator]


async def test_anthropic_tool_use_output_and_headers(server: Server) -> None:
    server.mode("ok")
    async with AnthropicMessages("claude-haiku-4-5", base_url=server.base,
                                 api_key=lambda: CANARY) as model:
        result = await model(task(max_tokens=1000))
    assert result.output == {"category": "billing"}
    assert (result.usage.tokens_in, result.usage.tokens_out) == (20, 9)
    assert result.usage.cost == pytest.approx(20 * 1e-6 + 9 * 5e-6)
    sent = server.state["requests"][0]
    assert sent["headers"]["x-api-key"] == CANARY
    assert sent["headers"]["anthropic-version"] == "2023-06-01"
    assert sent["body"]["tool_choice"] == {"type": "tool", "name": "respond"}
    # the grant less the request's estimate and Anthropic's hidden tool-use prompt
    unsent = {k: v for k, v in sent["body"].items() if k != "max_tokens"}
    assert sent["body"]["max_tokens"] == 1000 - estimate_tokens(unsent) - 350


@pytest.mark.parametrize(("mode", "kind"), [("529", "server_error"), ("429", "rate_limited"),
                                            ("401", "auth")])
async def test_anthropic_failures(server: Server, mode: str, kind: str) -> None:
    server.mode(mode)
    async with AnthropicMessages("claude-haiku-4-5", base_url=server.base,
                                 api_key=lambda: CANARY) as model:
        with pytest.raises(ExecutorError) as caught:
            await model(task(max_tokens=1000))
    assert caught.value.kind == kind
    assert_clean(caught.value)


class SessionsSeen(OpenAIChat):
    """OpenAIChat with its own sessions made through the public `session_factory` hook, so
    the test holds every session the executor opened."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.sessions: list[aiohttp.ClientSession] = []

    def session_factory(self) -> Callable[[], aiohttp.ClientSession]:
        def make() -> aiohttp.ClientSession:
            self.sessions.append(aiohttp.ClientSession(trust_env=False))
            return self.sessions[-1]
        return make


async def test_cancellation_leaves_no_task_or_connection_behind(server: Server) -> None:
    server.mode("slow")
    model = SessionsSeen("gpt-4o-mini", base_url=f"{server.base}/v1", api_key=lambda: CANARY)
    call = asyncio.create_task(model(task(timeout=10)))
    await asyncio.sleep(0.2)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    (session,) = model.sessions  # the one the cancelled call went through
    await model.close()
    assert session.closed
    await asyncio.sleep(0)
    assert [t for t in asyncio.all_tasks() if t is not asyncio.current_task()
            and "chat" in repr(t.get_coro())] == []


# --- HTTP tools and the SSRF guard ---------------------------------------------------------


def tool(server_base: str, **kw: Any) -> HttpTool:
    return HttpTool("GET", f"{server_base}/customers/{{customer_id}}", response=Customer, **kw)


async def test_a_tool_call_with_an_allow_listed_loopback(server: Server) -> None:
    server.mode("ok")
    http = tool(server.base, allow=["127.0.0.1/32"])
    result = await http(task({"customer_id": "c/1 x"}, schema=None))
    await http.close()
    assert result.output == {"customer": "c/1 x", "tier": "gold"}
    assert server.state["requests"][0]["path"] == "/customers/c%2F1%20x"
    assert server.state["requests"][0]["headers"]["Idempotency-Key"] == "r:classify:1"


@pytest.mark.parametrize("host", [
    "127.0.0.1", "10.1.2.3", "192.168.1.1", "172.16.0.1", "169.254.169.254", "100.64.0.1",
    "0.0.0.0", "[::1]", "[fd00:ec2::254]", "[::ffff:127.0.0.1]", "[::ffff:10.0.0.1]",
    "[64:ff9b::a00:1]", "[2002:a00:1::]", "[fe80::1]", "224.0.0.1",
    # IPv4-compatible IPv6 (::/96): ::127.0.0.1, ::10.0.0.1, ::169.254.169.254, even ::8.8.8.8
    "[::7f00:1]", "[::127.0.0.1]", "[::a00:1]", "[::a9fe:a9fe]", "[::808:808]",
    # IETF protocol assignments 192.0.0.0/24, all of it
    "192.0.0.8", "192.0.0.1", "192.0.0.9", "192.0.0.10", "192.0.0.170", "192.0.0.255",
    # local-use NAT64, site-local, documentation, reserved, benchmarking, Teredo, broadcast
    "[64:ff9b:1::a00:1]", "[fec0::1]", "[3fff::1]", "[2001:db8::1]", "240.0.0.1",
    "198.18.0.1", "[2001:0:4136:e378:8000:63bf:3fff:fdd2]", "255.255.255.255", "[::]",
    "[::ffff:192.0.0.8]", "[64:ff9b::c000:8]",
])
async def test_internal_addresses_are_refused_unless_allow_listed(host: str) -> None:
    http = HttpTool("GET", f"http://{host}:9/x")
    with pytest.raises(ExecutorError) as caught:
        await http(task(schema=None))
    await http.close()
    assert caught.value.kind == "refused"
    assert not caught.value.retryable


@pytest.mark.parametrize(("address", "allowed"), [
    ("8.8.8.8", True), ("::ffff:8.8.8.8", True), ("64:ff9b::808:808", True),
    ("2002:808:808::1", True), ("2606:4700:4700::1111", True),
    ("::7f00:1", False), ("::808:808", False), ("192.0.0.8", False), ("fec0::1", False),
])
def test_the_guard_judges_addresses(address: str, allowed: bool) -> None:
    assert Guard().allowed_address(ipaddress.ip_address(address)) is allowed


@pytest.mark.parametrize(("allow", "host"), [
    ("::7f00:1/128", "[::7f00:1]"), ("::/96", "[::a00:1]"), ("192.0.0.8", "192.0.0.8"),
    ("192.0.0.0/24", "192.0.0.170"),
])
def test_the_refused_ranges_can_be_allow_listed(allow: str, host: str) -> None:
    Guard([allow]).check_host(host)  # no error


async def test_a_name_resolving_to_loopback_is_refused_at_connect(server: Server) -> None:
    port = server.base.rsplit(":", 1)[1]
    http = HttpTool("GET", f"http://localhost:{port}/customers/1")
    with pytest.raises(ExecutorError) as caught:
        await http(task(schema=None))
    await http.close()
    assert caught.value.kind == "refused"
    assert "requests" not in server.state or not server.state["requests"]


async def test_redirects_are_off_by_default_and_checked_per_hop(server: Server) -> None:
    server.mode("redirect:http://10.0.0.1/customers/1")
    off = tool(server.base, allow=["127.0.0.1"])
    with pytest.raises(ExecutorError, match="redirects are off"):
        await off(task({"customer_id": "1"}, schema=None))
    await off.close()
    on = tool(server.base, allow=["127.0.0.1"], follow_redirects=True)
    with pytest.raises(ExecutorError) as caught:
        await on(task({"customer_id": "1"}, schema=None))
    await on.close()
    assert caught.value.kind == "refused"
    assert "10.0.0.1" in caught.value.message


@pytest.mark.parametrize(("mode", "kind"), [("oversized", "too_large"),
                                            ("endless", "too_large"), ("500", "server_error"),
                                            ("404", "not_found")])
async def test_tool_failures(server: Server, mode: str, kind: str) -> None:
    server.mode(mode)
    http = tool(server.base, allow=["127.0.0.1"], max_bytes=1024 * 1024)
    with pytest.raises(ExecutorError) as caught:
        await http(task({"customer_id": "1"}, schema=None, timeout=5))
    await http.close()
    assert caught.value.kind == kind


async def test_tool_secrets_come_from_the_environment_and_stay_out_of_errors(
    server: Server, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CRM_TOKEN", CANARY)
    server.mode("401")
    http = tool(server.base, allow=["127.0.0.1"],
                headers={"Authorization": "Bearer ${CRM_TOKEN}"})
    with pytest.raises(ExecutorError) as caught:
        await http(task({"customer_id": "1"}, schema=None))
    await http.close()
    assert server.state["requests"][0]["headers"]["Authorization"] == f"Bearer {CANARY}"
    assert caught.value.kind == "auth"
    assert_clean(caught.value)
    assert CANARY not in repr(http)


@pytest.fixture
async def elsewhere() -> AsyncIterator[Server]:
    """A second server: another origin (reached as localhost, not 127.0.0.1)."""
    async for running in _serve("localhost"):
        yield running


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
async def test_model_executors_never_follow_a_redirect_with_the_key(
    server: Server, elsewhere: Server, provider: str,
) -> None:
    path = "/v1/chat/completions" if provider == "openai" else "/v1/messages"
    server.mode(f"redirect:{elsewhere.base}{path}")  # 307: a client would re-send the POST
    model = (openai(server) if provider == "openai" else
             AnthropicMessages("claude-haiku-4-5", base_url=server.base,
                               api_key=lambda: CANARY))
    async with model:
        with pytest.raises(ExecutorError) as caught:
            await model(task(max_tokens=1000))
    assert (caught.value.kind, caught.value.retryable) == ("client_error", False)
    assert "redirect" in caught.value.message
    assert "requests" not in elsewhere.state
    assert_clean(caught.value)


async def test_a_redirect_to_another_origin_carries_only_allow_listed_headers(
    server: Server, elsewhere: Server, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CRM_TOKEN", CANARY)
    server.mode(f"redirect:{elsewhere.base}/customers/2")
    elsewhere.mode("ok")
    configured = {"Authorization": "Bearer ${CRM_TOKEN}", "X-Crm-Key": "${CRM_TOKEN}",
                  "X-Api-Key": CANARY, "api-key": CANARY, "X-Trace": "plain",
                  "Cookie": "session=1", "Accept": "application/json",
                  "User-Agent": "rulebound-test"}
    http = tool(server.base, allow=["127.0.0.1", "::1", "localhost"], follow_redirects=True,
                headers=configured)
    result = await http(task({"customer_id": "1"}, schema=None))
    await http.close()
    assert result.output == {"customer": "2", "tier": "gold"}
    first = server.state["requests"][0]["headers"]
    assert first["X-Crm-Key"] == first["X-Api-Key"] == CANARY  # same origin: all sent
    hop = elsewhere.state["requests"][0]["headers"]
    for name in ("Authorization", "X-Crm-Key", "X-Api-Key", "api-key", "X-Trace", "Cookie"):
        assert name not in hop
    assert CANARY not in str(hop)
    assert hop["Accept"] == "application/json" and hop["User-Agent"] == "rulebound-test"
    assert hop["Idempotency-Key"] == "r:classify:1"


async def test_a_same_origin_redirect_keeps_every_header(
    server: Server, monkeypatch: pytest.MonkeyPatch,
) -> None:
    server.mode(f"redirect:{server.base}/customers/2")
    http = tool(server.base, allow=["127.0.0.1"], follow_redirects=True, max_redirects=1,
                headers={"X-Api-Key": CANARY})
    with pytest.raises(ExecutorError, match="more than 1 redirects"):
        await http(task({"customer_id": "1"}, schema=None))
    await http.close()
    assert [r["headers"]["X-Api-Key"] for r in server.state["requests"]] == [CANARY] * 2


@pytest.mark.parametrize("location", ["http://127.0.0.1:99999/x", "http://[::1/x"])
async def test_a_redirect_to_an_invalid_url_is_a_client_error(
    server: Server, location: str,
) -> None:
    server.mode(f"redirect:{location}")
    http = tool(server.base, allow=["127.0.0.1"], follow_redirects=True)
    with pytest.raises(ExecutorError) as caught:
        await http(task({"customer_id": "1"}, schema=None))
    await http.close()
    assert (caught.value.kind, caught.value.retryable) == ("client_error", False)
    assert "invalid URL" in caught.value.message
