"""Model executors honour the attempt's grant: tokens, cost, time, and an explicit price.

Every test runs against the loopback fake provider, which caps completions as real services
do and, with prompt_tokens="count", counts prompt tokens like a real tokenizer would.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from rulebound.adapters.executors import AnthropicMessages, HttpTool, OpenAIChat
from rulebound.adapters.executors.models import MissingPrice, estimate_tokens
from rulebound.domain import FAIL, Retry, Step, Workflow
from rulebound.domain import events as ev
from rulebound.engine import Engine, ExecutorError

from .test_http_executors import CANARY, Label, Server, openai, server, task

__all__ = ["server"]  # the fixture, shared


def caps(srv: Server, field: str = "max_tokens") -> list[int]:
    return [r["body"][field] for r in srv.state["requests"]]


def unsent(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k not in ("max_tokens", "max_completion_tokens")}


# --- repairs: gated on the grant, not on a cost that defaults to 0 ----------------------


@pytest.mark.parametrize("max_cost", [0.0, None])
async def test_repairs_happen_when_the_step_declares_no_cost(server: Server,
                                                             max_cost: float | None) -> None:
    server.mode("invalid-then-valid")
    async with openai(server) as model:
        result = await model(task(max_cost=max_cost))
    assert result.output == {"category": "billing"}
    assert len(server.state["requests"]) == 2
    assert result.usage.tokens == 2 * (12 + 7)


async def test_every_round_is_capped_by_what_is_left_of_the_token_grant(
    server: Server,
) -> None:
    server.mode("always-invalid", prompt_tokens="count", completion_tokens=40)
    grant = 1500
    async with openai(server, repairs=3) as model:
        with pytest.raises(ExecutorError) as caught:
            await model(task(max_tokens=grant))
    requests = server.state["requests"]
    assert len(requests) == 4
    first = requests[0]["body"]
    assert first["max_tokens"] == grant - estimate_tokens(unsent(first))
    spent = 0
    for request in requests:
        sent = len(json.dumps(unsent(request["body"]))) // 4  # what the server counted
        assert spent + sent + request["body"]["max_tokens"] <= grant
        spent += sent + 40
    assert caps(server) == sorted(caps(server), reverse=True)  # shrinking with each round
    usage = caught.value.usage
    assert usage.tokens == spent <= grant
    assert caught.value.kind == "invalid_output"


async def test_a_repair_that_does_not_fit_the_token_grant_is_not_sent(server: Server) -> None:
    server.mode("always-invalid", completion_tokens=150)
    async with openai(server, repairs=3) as model:
        with pytest.raises(ExecutorError) as caught:
            await model(task(max_tokens=260))
    assert len(server.state["requests"]) == 1
    assert caught.value.kind == "invalid_output"
    assert "no repair: 260 tokens" in caught.value.message
    assert (caught.value.usage.tokens_in, caught.value.usage.tokens_out) == (12, 150)


async def test_a_reply_cut_off_by_its_cap_is_not_repaired_with_a_smaller_cap(
    server: Server,
) -> None:
    server.mode("always-invalid", completion_tokens=10_000)  # always runs into the cap
    async with openai(server, repairs=3, max_output_tokens=100) as model:
        with pytest.raises(ExecutorError) as caught:
            await model(task(max_tokens=2000))
    assert len(server.state["requests"]) == 1
    assert "cut off at 100 tokens" in caught.value.message
    assert caught.value.usage.tokens_out == 100


async def test_the_cost_grant_caps_each_round_and_gates_repairs(server: Server) -> None:
    # $1000 per million tokens = $0.001 a token; a $0.2 grant pays for 200 tokens in all
    server.mode("always-invalid", completion_tokens=100)
    async with openai(server, price=1000, repairs=3) as model:
        with pytest.raises(ExecutorError) as caught:
            await model(task(max_tokens=None, max_cost=0.2))
    first = server.state["requests"][0]["body"]
    assert first["max_tokens"] == math.floor(200 - estimate_tokens(unsent(first)))
    assert len(server.state["requests"]) == 1  # ~105 tokens spent: a repair cannot fit
    assert "no repair: $0.2" in caught.value.message
    assert caught.value.usage.cost == pytest.approx((12 + first["max_tokens"]) * 0.001)
    assert caught.value.usage.cost <= 0.2


async def test_a_grant_too_small_for_the_prompt_sends_nothing(server: Server) -> None:
    server.mode("ok")
    async with openai(server) as model:
        with pytest.raises(ExecutorError) as caught:
            await model(task(max_tokens=10))
    assert (caught.value.kind, caught.value.retryable) == ("budget", False)
    assert "10 tokens" in caught.value.message
    assert "requests" not in server.state


async def test_anthropic_counts_its_hidden_tool_prompt_into_the_grant(server: Server) -> None:
    server.mode("ok")
    async with AnthropicMessages("claude-haiku-4-5", base_url=server.base,
                                 api_key=lambda: CANARY) as model:
        with pytest.raises(ExecutorError) as caught:
            await model(task(max_tokens=300))  # the forced tool call alone costs ~350
        assert caught.value.kind == "budget"
        assert "requests" not in server.state
        result = await model(task(max_tokens=1000))
    assert result.usage.tokens <= 1000


async def test_without_a_token_grant_each_round_gets_the_configured_default(
    server: Server,
) -> None:
    server.mode("invalid-then-valid")
    async with openai(server, default_max_tokens=64) as model:
        await model(task(max_tokens=None, max_cost=0.0))
    assert caps(server) == [64, 64]


async def test_max_output_tokens_bounds_a_large_grant(server: Server) -> None:
    server.mode("ok")
    async with openai(server, max_output_tokens=4096) as model:
        await model(task(max_tokens=100_000))
    assert caps(server) == [4096]


async def test_usage_a_server_leaves_out_is_estimated_not_zero(server: Server) -> None:
    server.mode("ok", usage=False)
    async with openai(server) as model:
        result = await model(task())
    body = server.state["requests"][0]["body"]
    assert result.usage.tokens_in == estimate_tokens(unsent(body))
    assert result.usage.tokens_out == estimate_tokens('{"category": "billing"}')
    assert result.usage.cost > 0


@pytest.mark.parametrize(("text", "at_least"), [
    ("退款请求已收到" * 20, 2 * 7 * 20),  # CJK: 1-2 tokens a character in real tokenizers
    ("😀🚀" * 30, 3 * 60),  # emoji: 1-3 tokens each
    ("Grüße aus Köln " * 10, 10 * (12 // 3 + 3)),  # ASCII by thirds, one per ü, ß, ö
], ids=["cjk", "emoji", "accented-latin"])
def test_the_prompt_estimate_stays_high_for_text_beyond_ascii(text: str, at_least: int) -> None:
    assert estimate_tokens(text) >= at_least
    assert estimate_tokens({"content": text}) >= at_least
    assert estimate_tokens("plain English text, " * 30) == -(-600 // 3)  # ASCII: unchanged


# --- prices: a model without one is a configuration error, never a silent $0 ------------


def test_a_model_without_a_price_is_refused_at_construction() -> None:
    with pytest.raises(MissingPrice, match=r"no price for model 'llama3\.1'.*price=0"):
        OpenAIChat("llama3.1", base_url="http://127.0.0.1:9/v1")
    with pytest.raises(MissingPrice):
        AnthropicMessages("claude-unknown")
    with pytest.raises(ValueError, match="non-negative"):
        OpenAIChat("llama3.1", price=-1)


async def test_an_explicit_price_of_zero_is_free(server: Server) -> None:
    server.mode("ok")
    async with OpenAIChat("llama3.1", base_url=f"{server.base}/v1", price=0) as model:
        result = await model(task())
    assert result.usage.cost == 0.0
    assert result.usage.tokens == 19


async def test_prices_dated_snapshots_and_a_step_model_without_a_price(server: Server) -> None:
    server.mode("ok")
    model = OpenAIChat("gpt-4o-mini-2024-07-18", base_url=f"{server.base}/v1",
                       prices={"house-model": (1.0, 2.0)})
    async with model:
        dated = await model(task())
        house = await model(task(config={"model": "house-model"}))
        with pytest.raises(ExecutorError) as caught:
            await model(task(config={"model": "mystery"}))
    assert dated.usage.cost == pytest.approx(12 * 0.15e-6 + 7 * 0.6e-6)
    assert house.usage.cost == pytest.approx(12 * 1e-6 + 7 * 2e-6)
    assert (caught.value.kind, caught.value.retryable) == ("config", False)
    assert len(server.state["requests"]) == 2  # nothing sent for the unpriced model


# --- max_completion_tokens ---------------------------------------------------------------


async def test_reasoning_models_get_max_completion_tokens_and_no_temperature(
    server: Server,
) -> None:
    server.mode("ok")
    async with openai(server, prices={"gpt-5-mini": (0.25, 2.0)}) as model:  # auto
        await model(task(config={"model": "gpt-5-mini"}))
    async with OpenAIChat("o4-mini", base_url=f"{server.base}/v1", price=(1.1, 4.4)) as model:
        result = await model(task())
    for request in server.state["requests"]:
        body = request["body"]
        assert "max_tokens" not in body and "temperature" not in body
        assert 0 < body["max_completion_tokens"] <= 300
    assert result.output == {"category": "billing"}


async def test_token_param_can_be_chosen(server: Server) -> None:
    server.mode("ok")
    async with openai(server, token_param="max_completion_tokens") as model:
        await model(task())
    body = server.state["requests"][0]["body"]
    assert "max_tokens" not in body and 0 < body["max_completion_tokens"] <= 300
    server.mode("ok")
    async with OpenAIChat("gpt-5", base_url=f"{server.base}/v1", price=(1.25, 10),
                          token_param="max_tokens") as model:
        with pytest.raises(ExecutorError) as caught:
            await model(task())
    assert (caught.value.kind, caught.value.retryable) == ("client_error", False)
    with pytest.raises(ValueError, match="token_param"):
        OpenAIChat("gpt-4o", token_param="max_output")  # type: ignore[arg-type]


# --- time: every round shares the attempt's timeout, on the loop's clock -----------------


async def test_a_repair_round_never_outlives_the_attempts_timeout(server: Server) -> None:
    server.mode("invalid-then-slow")  # the first answer is invalid, the repair hangs
    attempt = task(timeout=0.6)
    async with openai(server) as model:
        began = time.monotonic()
        with pytest.raises(ExecutorError) as caught:
            await model(attempt)
        took = time.monotonic() - began
    assert caught.value.kind == "timeout"
    assert 0.5 < took < 1.5
    assert len(server.state["requests"]) == 2
    assert caught.value.usage.tokens == 19  # the first round was spent and still counts
    assert attempt.spent.usage == caught.value.usage


async def test_a_single_round_is_bounded_by_the_timeout_too(server: Server) -> None:
    server.mode("slow")
    async with AnthropicMessages("claude-haiku-4-5", base_url=server.base,
                                 api_key=lambda: CANARY) as model:
        began = time.monotonic()
        with pytest.raises(ExecutorError) as caught:
            await model(task(timeout=0.4, max_tokens=1000))
    assert caught.value.kind == "timeout"
    assert time.monotonic() - began < 1.5


# The engine's clock is injected: a fake clock's deadline may lie years from the wall clock.
# Executors time an attempt by task.timeout on the loop's monotonic clock, never by
# comparing the deadline with the wall clock (which timed out every call at once, or never).
SKEWS = pytest.mark.parametrize("skew", [timedelta(days=-3650), timedelta(days=3650)],
                                ids=["deadline-in-the-wall-clock-past", "far-future"])


@SKEWS
async def test_a_deadline_on_another_clock_neither_expires_a_call_nor_lifts_its_timeout(
    server: Server, skew: timedelta,
) -> None:
    elsewhen = datetime.now(UTC) + skew
    async with openai(server) as model:
        server.mode("ok")
        result = await model(task(timeout=5, deadline=elsewhen + timedelta(seconds=5)))
        assert result.output == {"category": "billing"}
        server.mode("slow")
        began = time.monotonic()
        with pytest.raises(ExecutorError) as caught:
            await model(task(timeout=0.4, deadline=elsewhen + timedelta(seconds=0.4)))
        took = time.monotonic() - began
    assert caught.value.kind == "timeout"
    assert 0.3 < took < 1.5  # the step's timeout: not at once, not never


@SKEWS
async def test_an_http_tool_under_a_fake_clock_runs_to_its_timeout(
    server: Server, skew: timedelta,
) -> None:
    elsewhen = datetime.now(UTC) + skew
    http = HttpTool("GET", f"{server.base}/customers/{{customer_id}}", allow=["127.0.0.1"])
    server.mode("ok")
    result = await http(task({"customer_id": "1"}, schema=None, timeout=5,
                             deadline=elsewhen + timedelta(seconds=5)))
    assert result.output == {"customer": "1", "tier": "gold"}
    server.mode("slow")
    began = time.monotonic()
    with pytest.raises(ExecutorError) as caught:
        await http(task({"customer_id": "1"}, schema=None, timeout=0.4,
                        deadline=elsewhen + timedelta(seconds=0.4)))
    await http.close()
    assert caught.value.kind == "timeout"
    assert 0.3 < time.monotonic() - began < 1.5


# --- usage: every round is reported to task.spent as soon as it is known ---------------


def anthropic(server: Server) -> AnthropicMessages:
    return AnthropicMessages("claude-haiku-4-5", base_url=server.base, api_key=lambda: CANARY)


@pytest.mark.parametrize(("provider", "first_round"), [("openai", 19), ("anthropic", 29)])
async def test_an_attempt_cancelled_from_outside_has_reported_the_rounds_it_spent(
    server: Server, provider: str, first_round: int,
) -> None:
    """What the engine does at its deadline: cancel the executor, which cannot answer."""
    server.mode("invalid-then-slow")  # a first (invalid) round, then a repair that hangs
    attempt = task(timeout=30, max_tokens=1000)
    async with openai(server) if provider == "openai" else anthropic(server) as model:
        call = asyncio.create_task(model(attempt))
        for _ in range(500):  # until the repair is in flight
            if len(server.state.get("requests", [])) >= 2:
                break
            await asyncio.sleep(0.01)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
    spent = attempt.spent.usage
    assert spent.tokens == first_round
    price = model.price_of(model.model)
    assert spent.cost == pytest.approx(
        spent.tokens_in * price[0] / 1e6 + spent.tokens_out * price[1] / 1e6)


async def test_spent_matches_what_the_attempt_reports_when_it_ends_itself(
    server: Server,
) -> None:
    server.mode("invalid-then-valid")
    ok = task()
    async with openai(server) as model:
        result = await model(ok)
        server.mode("always-invalid")
        bad = task()
        with pytest.raises(ExecutorError) as caught:
            await model(bad)
    assert ok.spent.usage == result.usage and result.usage.tokens == 38
    assert bad.spent.usage == caught.value.usage and caught.value.usage.tokens == 38


class _EngineWins:
    """Runs the model with a long timeout of its own, so that the engine's cancellation at
    the attempt's deadline, not the executor's timeout, ends a hung attempt."""

    def __init__(self, inner: OpenAIChat) -> None:
        self.inner, self.tasks = inner, []  # type: ignore[var-annotated]

    async def open(self, context: Any) -> None:
        await self.inner.open(context)

    async def close(self) -> None:
        await self.inner.close()

    async def __call__(self, task: Any) -> Any:
        self.tasks.append(task)
        return await self.inner(dataclasses.replace(task, timeout=30))  # same task.spent


@pytest.mark.parametrize("ends_it", ["either", "engine"])
async def test_through_the_engine_a_timed_out_repair_keeps_the_first_rounds_usage(
    server: Server, ends_it: str,
) -> None:
    """Whoever ends the hung repair, the executor's early timeout or the engine's
    cancellation at the deadline (which wins on a loaded machine whose loop stalls), the
    recorded failure carries the first round's usage: the executor reported it in
    task.spent before the repair was sent."""
    server.mode("invalid-then-slow")
    wf = Workflow("deadline", on_failure=FAIL, steps=[
        Step("classify", executor="llm", output=Label, timeout=0.8, retry=Retry(attempts=1),
             max_tokens=300, config={"prompt": "Classify: {text}"})])
    llm = _EngineWins(openai(server)) if ends_it == "engine" else openai(server)
    async with Engine("memory://", [wf], {"llm": llm}) as engine:
        run_id = await engine.start("deadline", {"text": "refund me"})
        view = await engine.wait(run_id, timeout=10)
        history = await engine.events(run_id)
    failed = [e for e in history if isinstance(e, ev.AttemptFailed)]
    assert view.status == "failed"
    assert [(e.error_type, e.usage.tokens) for e in failed] == [("timeout", 19)]
    assert view.usage.tokens == 19
    if isinstance(llm, _EngineWins):
        assert "within 0.8s" in failed[0].message  # the engine's timeout, not the executor's
        [attempt] = llm.tasks
        assert attempt.spent.usage == failed[0].usage
