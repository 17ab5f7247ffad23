"""FunctionExecutor and ScriptedModel, through a real engine where it matters."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any
from uuid import uuid4

import pytest
from rulebound.adapters.executors import FunctionExecutor, Script, ScriptedModel
from rulebound.domain import FAIL, Retry, Step, Workflow
from rulebound.engine import Engine, ExecutorError, Result, Task, Usage


def task(step: str = "s", attempt: int = 1, data: Any = None, key: str = "k") -> Task:
    return Task(run_id=uuid4(), step=step, attempt=attempt, idempotency_key=key, input=data,
                config={}, output_schema=None, timeout=5, deadline=datetime.now(UTC))


async def test_function_executor_takes_input_or_input_and_task() -> None:
    async def one(data: Any) -> Any:
        return {"twice": data * 2}

    async def two(data: Any, t: Task) -> Result:
        return Result({"step": t.step}, Usage(tokens_in=1))

    assert (await FunctionExecutor(one)(task(data=2))).output == {"twice": 4}
    result = await FunctionExecutor(two)(task(step="x"))
    assert result.output == {"step": "x"}
    assert result.usage.tokens_in == 1
    with pytest.raises(TypeError, match="async"):
        FunctionExecutor(lambda data: data)  # type: ignore[arg-type, return-value]


async def test_function_executor_classifies_errors_and_never_swallows_cancellation() -> None:
    async def broken(data: Any) -> Any:
        raise KeyError("missing")

    async def busy(data: Any) -> Any:
        raise ExecutorError("busy", kind="rate_limited", retryable=True, retry_after=2)

    with pytest.raises(ExecutorError) as caught:
        await FunctionExecutor(broken)(task())
    assert (caught.value.kind, caught.value.retryable) == ("error", False)
    assert "KeyError" in caught.value.message
    with pytest.raises(ExecutorError) as caught:
        await FunctionExecutor(busy)(task())
    assert (caught.value.kind, caught.value.retry_after) == ("rate_limited", 2)

    started = asyncio.Event()

    async def slow(data: Any) -> Any:
        started.set()
        await asyncio.sleep(60)

    running = asyncio.create_task(FunctionExecutor(slow)(task()))
    await started.wait()
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running


async def test_scripted_model_is_deterministic_per_task() -> None:
    model = ScriptedModel({"s": Script(output=lambda d: {"echo": d}, flaky=0.5,
                                       latency=0.001, jitter=0.5)})
    outcomes = []
    for _ in range(2):
        seen = []
        for key in [f"k{i}" for i in range(40)]:
            try:
                seen.append((await model(task(key=key, data=key))).output)
            except ExecutorError as exc:
                seen.append(exc.kind)
        outcomes.append(seen)
    assert outcomes[0] == outcomes[1]
    assert 5 < outcomes[0].count("server_error") < 35  # about half of first attempts


async def test_scripted_failures_then_success_through_the_engine(sqlite_url: str) -> None:
    model = ScriptedModel({"s": Script(output={"ok": True}, failures=["rate_limited",
                                                                       "server_error"],
                                       retry_after=0.05, usage=Usage(tokens_out=7))})
    wf = Workflow("w", on_failure=FAIL, steps=[
        Step("s", executor="m", max_tokens=50, retry=Retry(attempts=3, backoff=0.01))])
    async with Engine(sqlite_url, [wf], {"m": model}) as engine:
        view = await engine.wait(await engine.start("w"), timeout=5)
    assert view.status == "completed"
    assert view.usage.tokens_out == 7
    assert model.calls == [("s", 1), ("s", 2), ("s", 3)]


async def test_a_hanging_script_meets_the_step_timeout(sqlite_url: str) -> None:
    wf = Workflow("w", on_failure=FAIL, steps=[
        Step("s", executor="m", timeout=0.1, max_tokens=50, retry=Retry(attempts=1))])
    async with Engine(sqlite_url, [wf], {"m": ScriptedModel({"s": Script(hang=True)})}) as e:
        view = await e.wait(await e.start("w"), timeout=5)
    assert view.error_type == "timeout"
