"""The Engine facade against real stores: runs, waits, signals, cancels, limits, timeouts."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from pydantic import BaseModel
from rulebound.domain import (
    END,
    FAIL,
    Limits,
    Parallel,
    Retry,
    Route,
    Step,
    WaitForSignal,
    Workflow,
    field,
)
from rulebound.domain.errors import DefinitionError, RunNotFound
from rulebound.engine import (
    Engine,
    InvalidInput,
    RateLimit,
    Result,
    RetryableError,
    RunTerminal,
    Task,
    Usage,
    WorkflowNotFound,
)


class Label(BaseModel):
    category: str


class Ticket(BaseModel):
    text: str


async def echo(task: Task) -> Any:
    return {"seen": task.input, "step": task.step}


def linear(n: int = 3, name: str = "linear", **step_kw: Any) -> Workflow:
    return Workflow(name, on_failure=FAIL, steps=[
        Step(f"s{i}", executor="echo", next=f"s{i + 1}" if i + 1 < n else END, **step_kw)
        for i in range(n)])


async def test_a_linear_run_completes_and_its_events_replay(store_url: str) -> None:
    async with Engine(store_url, [linear()], {"echo": echo}) as engine:
        run_id = await engine.start("linear", {"x": 1})
        view = await engine.wait(run_id, timeout=10)
        assert view.status == "completed"
        assert view.output == {"seen": {"x": 1}, "step": "s2"}
        events = await engine.events(run_id)
        types = [e.type for e in events]
        assert types[0] == "RunStarted" and types[-1] == "RunCompleted"
        assert types.count("AttemptSucceeded") == 3
        assert all(e.id is not None and e.hash is not None for e in events)
        from rulebound.domain.state import replay
        from rulebound.engine.views import RunView
        assert RunView.of(run_id, replay(events)).to_dict() == view.to_dict()
        text = await engine.explain(run_id)
        assert "transition s0 -> s1" in text and "run completed" in text


async def test_routes_and_schema_validated_outputs(store_url: str) -> None:
    async def classify(task: Task) -> Result:
        return Result({"category": "billing" if "refund" in task.input["text"] else "other"},
                      Usage(tokens_in=10, tokens_out=5, cost=0.001))

    wf = Workflow("router", input_schema=Ticket, on_failure=FAIL, steps=[
        Step("classify", executor="classify", output=Label, cost=0.01,
             routes=[Route("billing", when=field("classify.category") == "billing")],
             next="other"),
        Step("billing", executor="echo"), Step("other", executor="echo")])
    async with Engine(store_url, [wf], {"classify": classify, "echo": echo}) as engine:
        a = await engine.wait(await engine.start("router", {"text": "refund me"}))
        b = await engine.wait(await engine.start("router", {"text": "hello"}))
        assert a.output["step"] == "billing" and b.output["step"] == "other"
        assert a.usage.cost == pytest.approx(0.001) and a.usage.tokens == 15
        taken = [e for e in await engine.events(a.run_id) if e.type == "TransitionTaken"]
        assert taken[0].condition == "classify.category == 'billing'"
        assert taken[0].values == {"classify.category": "billing"}
        with pytest.raises(InvalidInput, match="text"):
            await engine.start("router", {"nope": 1})
        with pytest.raises(WorkflowNotFound):
            await engine.start("missing", {})


async def test_schema_invalid_output_is_a_failed_attempt_then_retried(store_url: str) -> None:
    calls: list[int] = []

    async def sloppy(task: Task) -> Any:
        calls.append(task.attempt)
        return {"category": 3} if task.attempt == 1 else {"category": "ok"}

    wf = Workflow("sloppy", on_failure=FAIL, steps=[
        Step("s", executor="m", output=Label, retry=Retry(attempts=2, backoff=0))])
    async with Engine(store_url, [wf], {"m": sloppy}) as engine:
        view = await engine.wait(await engine.start("sloppy"), timeout=10)
        assert view.status == "completed" and calls == [1, 2]
        failed = [e for e in await engine.events(view.run_id) if e.type == "AttemptFailed"]
        assert failed[0].error_type == "invalid_output" and "category" in failed[0].message


async def test_a_hanging_executor_is_cancelled_at_its_deadline(store_url: str) -> None:
    cancelled = asyncio.Event()

    async def hang(task: Task) -> Any:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    wf = Workflow("hang", on_failure=FAIL, steps=[
        Step("s", executor="hang", timeout=0.2, retry=Retry(attempts=1))])
    async with Engine(store_url, [wf], {"hang": hang}) as engine:
        began = time.monotonic()
        view = await engine.wait(await engine.start("hang"), timeout=10)
        elapsed = time.monotonic() - began
        assert view.status == "failed" and view.error_type == "timeout"
        assert cancelled.is_set()
        assert 0.2 <= elapsed < 2.0
        events = await engine.events(view.run_id)
        started = next(e for e in events if e.type == "AttemptStarted")
        failed = next(e for e in events if e.type == "AttemptFailed")
        assert failed.error_type == "timeout" and failed.retryable
        assert (failed.at - started.at).total_seconds() == pytest.approx(0.2, abs=0.15)
    leftover = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    assert not leftover, leftover


async def test_rate_limits_delay_and_never_drop(store_url: str) -> None:
    calls: list[float] = []

    async def call(task: Task) -> Any:
        calls.append(time.monotonic())
        return {}

    wf = Workflow("limited", on_failure=FAIL, steps=[Step("s", executor="api")])
    limit = RateLimit(requests=4, per=0.5)
    async with Engine(store_url, [wf], {"api": call}, rate_limits={"api": limit}) as engine:
        ids = [await engine.start("limited", {"i": i}) for i in range(14)]
        views = [await engine.wait(r, timeout=20) for r in ids]
    assert all(v.status == "completed" for v in views)
    assert len(calls) == 14
    calls.sort()
    for i, t in enumerate(calls):  # no 0.5 s window ever holds more than 4 calls
        assert sum(1 for u in calls[i:] if u - t < limit.per - 0.01) <= limit.requests
    assert calls[-1] - calls[0] >= 3 * limit.per - 0.05  # it was delayed, not dropped


async def test_token_rate_limits_hold_in_every_window_and_drop_nothing(store_url: str) -> None:
    calls: list[tuple[float, int]] = []

    async def call(task: Task) -> Any:
        calls.append((time.monotonic(), task.max_tokens or 0))
        return Result(output={}, usage=Usage(tokens_in=10, tokens_out=task.max_tokens - 10))

    wf = Workflow("tokens", on_failure=FAIL, limits=Limits(max_tokens=10_000),
                  steps=[Step("s", executor="llm", max_tokens=40)])
    limit = RateLimit(tokens=100, per=0.4)  # two 40-token calls fit a window, three do not
    async with Engine(store_url, [wf], {"llm": call}, rate_limits={"llm": limit}) as engine:
        ids = [await engine.start("tokens", {"i": i}) for i in range(9)]
        views = [await engine.wait(r, timeout=20) for r in ids]
    assert all(v.status == "completed" for v in views)
    assert len(calls) == 9 and all(granted == 40 for _, granted in calls)
    calls.sort()
    for i, (t, _) in enumerate(calls):  # no 0.4 s window ever holds more than 100 tokens
        assert sum(n for u, n in calls[i:] if u - t < limit.per - 0.01) <= limit.tokens
    assert calls[-1][0] - calls[0][0] >= 3 * limit.per - 0.05  # delayed, not dropped


async def test_usage_beyond_the_grant_is_recorded_and_counted(
        store_url: str, caplog: pytest.LogCaptureFixture) -> None:
    async def greedy(task: Task) -> Any:
        usage = Usage(tokens_in=30, tokens_out=task.max_tokens)  # more than it was granted
        if task.attempt == 1:
            raise RetryableError("flaky", usage=usage)
        return Result(output={}, usage=usage)

    wf = Workflow("greedy", on_failure=FAIL, limits=Limits(max_tokens=1000),
                  steps=[Step("s", executor="llm", max_tokens=50,
                              retry=Retry(attempts=2, backoff=0))])
    async with Engine(store_url, [wf], {"llm": greedy}) as engine:
        view = await engine.wait(await engine.start("greedy"), timeout=10)
        assert view.status == "completed"
        assert view.usage.tokens == 2 * 80  # the facts are kept as reported
        assert engine.metrics.grant_overruns == 2  # the failed attempt counts too
    assert "overran its grant" in caplog.text


async def test_a_timed_out_attempt_keeps_the_usage_its_executor_reported(
        store_url: str) -> None:
    async def slow_model(task: Task) -> Any:
        task.spent.add(Usage(tokens_in=12, tokens_out=30, cost=0.002))  # a first round...
        await asyncio.sleep(30)  # ...then a repair that never returns

    wf = Workflow("slow", on_failure=FAIL, steps=[
        Step("s", executor="llm", timeout=0.2, cost=0.01, max_tokens=100,
             retry=Retry(attempts=1))])
    async with Engine(store_url, [wf], {"llm": slow_model}) as engine:
        run_id = await engine.start("slow")
        view = await engine.wait(run_id, timeout=10)
        failed = next(e for e in await engine.events(run_id) if e.type == "AttemptFailed")
    assert failed.error_type == "timeout"
    assert (failed.usage.tokens_in, failed.usage.tokens_out) == (12, 30)
    assert view.status == "failed" and view.usage.tokens == 42
    assert view.usage.cost == pytest.approx(0.002)


async def test_a_token_rate_limit_needs_a_reservation_on_every_step(store_url: str) -> None:
    wf = Workflow("unreserved", on_failure=FAIL, steps=[Step("s", executor="llm")])
    engine = Engine(store_url, [wf], {"llm": echo},
                    rate_limits={"llm": RateLimit(tokens=100, per=1)})
    with pytest.raises(DefinitionError, match=r"max_tokens.*'s' of 'unreserved'"):
        await engine.open()


async def test_model_steps_must_declare_their_token_ceiling(store_url: str) -> None:
    # Without a ceiling a model step reserves nothing, and the run's token limit is kept only
    # by reservations: a loop of such steps could spend past it.
    from rulebound.adapters.executors import AnthropicMessages, OpenAIChat, Script, ScriptedModel

    assert OpenAIChat.spends_tokens and AnthropicMessages.spends_tokens
    model = ScriptedModel({}, default=Script(output={"ok": True}))
    wf = Workflow("unbudgeted", on_failure=FAIL, steps=[
        Step("plain", executor="echo", next="fan"),
        Parallel("fan", next=END, branches=[Step("a", executor="llm", max_tokens=100),
                                            Step("b", executor="llm")])])
    engine = Engine(store_url, [wf], {"llm": model, "echo": echo})
    with pytest.raises(DefinitionError, match=r"max_tokens.*'b' of 'unbudgeted' \(executor "
                                              r"'llm'\)") as refused:
        await engine.open()
    assert "'a'" not in str(refused.value) and "'plain'" not in str(refused.value)

    tool = ScriptedModel({}, default=Script(output={"ok": True}), spends_tokens=False)
    async with Engine(store_url, [wf], {"llm": tool, "echo": echo}) as engine:
        assert (await engine.wait(await engine.start("unbudgeted"), timeout=10)).status == (
            "completed")

    budgeted = Workflow("later", on_failure=FAIL, steps=[Step("s", executor="llm",
                                                              max_tokens=10)])
    unbudgeted = Workflow("later", on_failure=FAIL, steps=[Step("s", executor="llm")])
    async with Engine(store_url, [budgeted], {"llm": model}) as engine:
        with pytest.raises(DefinitionError, match="max_tokens"):
            engine.register(unbudgeted)  # at run time too, and nothing is registered
        assert engine.registry.versions("later") == [budgeted]


async def test_an_older_unbudgeted_version_may_stay_registered_to_finish_its_runs(
        store_url: str, caplog: pytest.LogCaptureFixture) -> None:
    from rulebound.adapters.executors import Script, ScriptedModel

    model = ScriptedModel({}, default=Script(output={"ok": True}))
    old = Workflow("upgraded", on_failure=FAIL, steps=[Step("s", executor="llm")])
    new = Workflow("upgraded", on_failure=FAIL, steps=[Step("s", executor="llm",
                                                            max_tokens=10)])
    with caplog.at_level("WARNING", logger="rulebound.engine"):
        async with Engine(store_url, [old, new], {"llm": model}) as engine:
            view = await engine.wait(await engine.start("upgraded"), timeout=10)
    assert view.status == "completed"
    assert any("older version of 'upgraded'" in r.getMessage() for r in caplog.records)
    with pytest.raises(DefinitionError, match="max_tokens"):  # but never as the newest
        await Engine(store_url, [new, old], {"llm": model}).open()


async def test_register_keeps_the_token_rate_limit_rule_too(store_url: str) -> None:
    ok = Workflow("limited", on_failure=FAIL, steps=[Step("s", executor="llm", max_tokens=5)])
    bad = Workflow("limited", on_failure=FAIL, steps=[Step("s", executor="llm")])
    async with Engine(store_url, [ok], {"llm": echo},
                      rate_limits={"llm": RateLimit(tokens=100, per=1)}) as engine:
        with pytest.raises(DefinitionError, match=r"token rate limit.*'s' of 'limited'"):
            engine.register(bad)
        assert engine.registry.versions("limited") == [ok]


@pytest.mark.parametrize("limits", ["slots", "rate"])
async def test_runs_waiting_for_a_slot_or_a_rate_limit_sleep_instead_of_spinning(
        store_url: str, limits: str) -> None:
    # An attempt that is due but cannot start (no free dispatch slot, or its rate limit says
    # wait) must not re-arm a timer for its past not-before time: that woke the run in a busy
    # loop, starving the store's writer thread of the GIL (a 1 s demo took up to 90 s).
    async def work(task: Task) -> Any:
        await asyncio.sleep(0.02)
        return {}

    wf = Workflow("busy", on_failure=FAIL, steps=[
        Step("a", executor="w", next="b"), Step("b", executor="w", next="c"),
        Step("c", executor="w")])
    options: dict[str, Any] = (
        {"max_concurrency": 2} if limits == "slots"
        else {"rate_limits": {"w": RateLimit(requests=4, per=0.2)}})
    async with Engine(store_url, [wf], {"w": work}, **options) as engine:
        ids = [await engine.start("busy", {"i": i}) for i in range(12)]
        views = [await engine.wait(r, timeout=30) for r in ids]
    assert all(v.status == "completed" for v in views)
    wakes = engine.metrics.wakes
    assert wakes <= 10 * 12 * 3, wakes  # a few per attempt


async def test_idempotent_start_under_50_concurrent_calls(sqlite_url: str) -> None:
    async with Engine(sqlite_url, [linear()], {"echo": echo}) as engine:
        ids = await asyncio.gather(*(engine.start("linear", {"x": 1}, idempotency_key="k-1")
                                     for _ in range(50)))
        assert len(set(ids)) == 1
        await engine.wait(ids[0], timeout=10)
        events = await engine.events(ids[0])
        assert sum(1 for e in events if e.type == "RunStarted") == 1
    async with Engine(sqlite_url, [linear()], {"echo": echo}) as engine:  # and after restart
        again = await engine.start("linear", {"x": 1}, idempotency_key="k-1")
        assert again == ids[0]
        assert len(await engine.events(again)) == len(events)


async def test_signals_reach_a_waiting_step_and_terminal_runs_refuse_them(
    store_url: str,
) -> None:
    class Approval(BaseModel):
        approved: bool

    wf = Workflow("approve", on_failure=FAIL, steps=[
        Step("prepare", executor="echo", next="wait"),
        WaitForSignal("wait", signal="approval", timeout=30, output=Approval,
                      routes=[Route("yes", when=field("wait.approved").is_true())], next="no"),
        Step("yes", executor="echo"), Step("no", executor="echo")])
    async with Engine(store_url, [wf], {"echo": echo}) as engine:
        run_id = await engine.start("approve", {})
        for _ in range(100):
            if (await engine.get(run_id)).waiting_for == ("approval",):
                break
            await asyncio.sleep(0.01)
        with pytest.raises(InvalidInput, match="approved"):
            await engine.signal(run_id, "approval", {"approved": "maybe?"})
        await engine.signal(run_id, "approval", {"approved": True})
        view = await engine.wait(run_id, timeout=10)
        assert view.output["step"] == "yes"
        with pytest.raises(RunTerminal):
            await engine.signal(run_id, "approval", {"approved": True})
        with pytest.raises(RunTerminal):
            await engine.cancel(run_id)
        with pytest.raises(RunNotFound):
            await engine.get("not-a-uuid")


async def test_signal_timeout_follows_the_timeout_path(store_url: str) -> None:
    wf = Workflow("timeout", on_failure=FAIL, steps=[
        WaitForSignal("wait", signal="go", timeout=0.2, on_timeout="late"),
        Step("late", executor="echo")])
    async with Engine(store_url, [wf], {"echo": echo}) as engine:
        view = await engine.wait(await engine.start("timeout"), timeout=10)
        assert view.status == "completed" and view.output["step"] == "late"
        types = [e.type for e in await engine.events(view.run_id)]
        assert "TimerFired" in types


async def test_cancel_stops_in_flight_work(store_url: str) -> None:
    started = asyncio.Event()

    async def slow(task: Task) -> Any:
        started.set()
        await asyncio.sleep(3600)

    wf = Workflow("slow", on_failure=FAIL, steps=[
        Parallel("both", branches=[Step("a", executor="slow"), Step("b", executor="slow")])])
    async with Engine(store_url, [wf], {"slow": slow}) as engine:
        run_id = await engine.start("slow")
        await asyncio.wait_for(started.wait(), 5)
        await engine.cancel(run_id, "user changed their mind")
        view = await engine.wait(run_id, timeout=5)
        assert view.status == "cancelled" and view.reason == "user changed their mind"
        last = (await engine.events(run_id))[-1]
        assert last.type == "RunCancelled" and sorted(last.in_flight) == ["a", "b"]


async def test_budget_limit_stops_a_run_before_it_overspends(store_url: str) -> None:
    async def costly(task: Task) -> Result:
        assert task.max_cost == 0.4 and task.max_tokens == 100
        return Result({}, Usage(tokens_in=50, tokens_out=50, cost=0.3))

    wf = Workflow("budget", limits=Limits(max_cost=1.0), on_failure=FAIL, steps=[
        Step(f"s{i}", executor="llm", cost=0.4, max_tokens=100,
             next=f"s{i + 1}" if i < 4 else END) for i in range(5)])
    async with Engine(store_url, [wf], {"llm": costly}) as engine:
        view = await engine.wait(await engine.start("budget"), timeout=10)
        assert view.status == "failed" and view.error_type == "cost_limit"
        assert view.usage.cost <= 1.0
        limit = next(e for e in await engine.events(view.run_id) if e.type == "LimitReached")
        assert limit.limit == "cost" and limit.step == "s3"  # 3 x 0.3 spent, 0.4 > 0.1 left


async def test_retryable_failures_retry_with_recorded_backoff(store_url: str) -> None:
    async def flaky(task: Task) -> Any:
        if task.attempt < 3:
            raise RetryableError("503", kind="server_error", retry_after=0.05)
        return {"attempt": task.attempt, "key": task.idempotency_key}

    wf = Workflow("flaky", on_failure=FAIL, steps=[
        Step("s", executor="flaky", retry=Retry(attempts=3, backoff=0.01))])
    async with Engine(store_url, [wf], {"flaky": flaky}) as engine:
        view = await engine.wait(await engine.start("flaky"), timeout=10)
        assert view.status == "completed" and view.output["attempt"] == 3
        assert view.output["key"] == f"{view.run_id}:s:1"  # stable across retries
        events = await engine.events(view.run_id)
        retries = [e for e in events if e.type == "StepScheduled" and e.attempt > 1]
        assert len(retries) == 2
        for retry in retries:
            assert (retry.not_before - retry.at).total_seconds() >= 0.049
            started = next(e for e in events if e.type == "AttemptStarted"
                           and e.attempt == retry.attempt)
            assert started.at >= retry.not_before  # nothing is sent before the hint


async def test_restart_abandons_in_flight_attempts_and_resumes(sqlite_url: str) -> None:
    release = asyncio.Event()
    first_call = asyncio.Event()
    seen: list[tuple[str, int]] = []

    async def blocking(task: Task) -> Any:
        seen.append((task.step, task.attempt))
        first_call.set()
        await release.wait()
        return {}

    wf = linear(2, retry=Retry(attempts=3, backoff=0))
    async with Engine(sqlite_url, [wf], {"echo": blocking}, drain_timeout=0.05) as engine:
        run_id = await engine.start("linear")
        await asyncio.wait_for(first_call.wait(), 5)
    release.set()
    async with Engine(sqlite_url, [wf], {"echo": blocking}) as engine:
        view = await engine.wait(run_id, timeout=10)
        assert view.status == "completed"
        types = [e.type for e in await engine.events(run_id)]
        assert types.count("AttemptAbandoned") == 1
    assert seen[:2] == [("s0", 1), ("s0", 2)]


async def test_runs_on_an_unregistered_version_are_held_until_it_returns(
    sqlite_url: str,
) -> None:
    release = asyncio.Event()

    async def blocking(task: Task) -> Any:
        await release.wait()
        return {}

    v1 = linear(2, timeout=5.0)
    v2 = linear(2, timeout=6.0)
    assert v1.hash != v2.hash
    async with Engine(sqlite_url, [v1], {"echo": blocking}, drain_timeout=0.01) as engine:
        run_id = await engine.start("linear")
        await asyncio.sleep(0.05)
    release.set()
    async with Engine(sqlite_url, [v2], {"echo": blocking}) as engine:
        view = await engine.get(run_id)
        assert view.status == "held" and "not registered" in (view.reason or "")
        new = await engine.wait(await engine.start("linear"), timeout=5)
        assert new.definition_hash == v2.hash and new.status == "completed"
        engine.register(v1, newest=False)  # only to let its held run finish
        resumed = await engine.wait(run_id, timeout=5)
        assert resumed.status == "completed" and resumed.definition_hash == v1.hash
        later = await engine.wait(await engine.start("linear"), timeout=5)
        assert later.definition_hash == v2.hash  # new runs still take the newest
        assert engine.registry.versions("linear") == [v1, v2]
        v3 = linear(2, timeout=7.0)
        engine.register(v3)  # by default a registered version is the newest
        assert (await engine.wait(await engine.start("linear"), timeout=5)
                ).definition_hash == v3.hash
        engine.register(v1)  # a known version registered as newest becomes the newest
        assert engine.registry.versions("linear") == [v2, v3, v1]
        engine.register(v2, newest=False)  # a known version is otherwise left where it is
        assert engine.registry.latest("linear") == v1


async def test_a_corrupt_run_is_quarantined_and_others_go_on(sqlite_url: str) -> None:
    import sqlite3

    release = asyncio.Event()

    async def blocking(task: Task) -> Any:
        await release.wait()
        return {}

    wf = linear(2)
    async with Engine(sqlite_url, [wf], {"echo": blocking}, drain_timeout=0.01) as engine:
        bad = await engine.start("linear", {"n": "bad"})
        good = await engine.start("linear", {"n": "good"})
        await asyncio.sleep(0.05)
    path = sqlite_url.removeprefix("sqlite:///")
    with sqlite3.connect(path) as db:
        tables = [r[0] for r in db.execute("select name from sqlite_master where type='table'")]
        table = next(t for t in tables if "event" in t.lower())
        db.execute(f"update {table} set state = ? where originator_id = ? and "
                   "originator_version = 2", (b"{not json", bad.hex))
        if db.total_changes == 0:
            db.execute(f"update {table} set state = ? where originator_id = ? and "
                       "originator_version = 2", (b"{not json", str(bad)))
        assert db.total_changes == 1
    release.set()
    async with Engine(sqlite_url, [wf], {"echo": blocking}) as engine:
        assert (await engine.wait(good, timeout=5)).status == "completed"
        from rulebound.domain.errors import CorruptRun
        with pytest.raises(CorruptRun, match=str(bad)):
            await engine.get(bad)


async def test_watch_streams_events_until_the_end(store_url: str) -> None:
    gate = asyncio.Event()

    async def gated(task: Task) -> Any:
        await gate.wait()
        return {}

    async with Engine(store_url, [linear(2)], {"echo": gated}) as engine:
        run_id = await engine.start("linear")
        seen: list[str] = []

        async def follow() -> None:
            async for event in engine.watch(run_id):
                seen.append(event.type)

        follower = asyncio.create_task(follow())
        await asyncio.sleep(0.05)
        gate.set()
        await asyncio.wait_for(follower, 5)
        assert seen == [e.type for e in await engine.events(run_id)]
        assert seen[-1] == "RunCompleted"


async def test_the_read_model_lists_runs_by_status(store_url: str) -> None:
    async def boom(task: Task) -> Any:
        raise RuntimeError("no")

    wf = Workflow("boom", on_failure=FAIL, steps=[Step("s", executor="boom",
                                                       retry=Retry(attempts=1))])
    async with Engine(store_url, [linear(1), wf], {"echo": echo, "boom": boom}) as engine:
        ok = [await engine.start("linear") for _ in range(3)]
        bad = await engine.start("boom")
        for r in [*ok, bad]:
            await engine.wait(r, timeout=5)
        assert {r.run_id for r in await engine.runs(status="completed")} == set(ok)
        assert [r.run_id for r in await engine.runs(status="failed")] == [bad]
        assert [r.run_id for r in await engine.runs(workflow="boom")] == [bad]
        assert await engine.count_runs() == {"completed": 3, "failed": 1}


async def test_signal_waits_and_timers_survive_a_restart(sqlite_url: str) -> None:
    wf = Workflow("waits", on_failure=FAIL, steps=[
        WaitForSignal("wait", signal="go", timeout=0.6, on_timeout="late", next="on_time"),
        Step("on_time", executor="echo"), Step("late", executor="echo")])
    async with Engine(sqlite_url, [wf], {"echo": echo}) as engine:
        signalled = await engine.start("waits", {"n": 1})
        timed_out = await engine.start("waits", {"n": 2})
        await asyncio.sleep(0.05)
    # The engine is gone; the waits are only in the log now.
    async with Engine(sqlite_url, [wf], {"echo": echo}) as engine:
        assert (await engine.get(signalled)).waiting_for == ("go",)
        await engine.signal(signalled, "go", {"ok": True})
        assert (await engine.wait(signalled, timeout=5)).output["step"] == "on_time"
        view = await engine.wait(timed_out, timeout=5)  # its timer was re-armed from the log
        assert view.output["step"] == "late"
        timer = [e for e in await engine.events(timed_out) if e.type == "TimerFired"]
        assert [t.timer for t in timer] == ["signal:wait"]


async def test_a_retry_backoff_survives_a_restart(sqlite_url: str) -> None:
    calls: list[int] = []

    async def flaky(task: Task) -> Any:
        calls.append(task.attempt)
        if task.attempt == 1:
            raise RetryableError("busy", kind="server_error", retry_after=0.5)
        return {"attempt": task.attempt}

    wf = Workflow("backoff", on_failure=FAIL, steps=[
        Step("s", executor="flaky", retry=Retry(attempts=2, backoff=0))])
    async with Engine(sqlite_url, [wf], {"flaky": flaky}) as engine:
        run_id = await engine.start("backoff")
        await asyncio.sleep(0.1)
    assert calls == [1]
    async with Engine(sqlite_url, [wf], {"flaky": flaky}) as engine:
        view = await engine.wait(run_id, timeout=5)
    assert view.output == {"attempt": 2}
    assert calls == [1, 2]
    events = await _events(sqlite_url, run_id)
    retry = next(e for e in events if e.type == "StepScheduled" and e.attempt == 2)
    started = next(e for e in events if e.type == "AttemptStarted" and e.attempt == 2)
    assert started.at >= retry.not_before


async def _events(url: str, run_id: Any) -> list[Any]:
    async with Engine(url, recover=False) as engine:
        return await engine.events(run_id)


async def test_values_json_cannot_hold_are_refused_not_crashed(store_url: str) -> None:
    async def huge(task: Task) -> Any:
        return {"n": 2**70}

    wf = Workflow("huge", on_failure=FAIL, steps=[Step("s", executor="huge",
                                                       retry=Retry(attempts=3, backoff=0))])
    async with Engine(store_url, [wf], {"huge": huge}) as engine:
        with pytest.raises(InvalidInput, match="JSON"):
            await engine.start("huge", {"n": 2**70})
        run_id = await engine.start("huge", {})
        view = await engine.wait(run_id, timeout=5)
        assert view.status == "failed"
        assert view.error_type == "unstorable_output"
        # The same output would fail the same way: one attempt, no retries spent on it.
        failed = [e for e in await engine.events(run_id) if e.type == "AttemptFailed"]
        assert len(failed) == 1 and not failed[0].retryable  # type: ignore[attr-defined]


@pytest.mark.parametrize("after", [-1, 2**63, 2**64, 1.5, "3", True])
async def test_reading_events_after_an_impossible_position_is_invalid_input(
        store_url: str, after: Any) -> None:
    async with Engine(store_url, [linear()], {"echo": echo}) as engine:
        run_id = await engine.start("linear")
        await engine.wait(run_id, timeout=10)
        with pytest.raises(InvalidInput, match="after must be an integer"):
            await engine.events(run_id, after=after)
        with pytest.raises(InvalidInput, match="after must be an integer"):
            async for _ in engine.watch(run_id, after=after):
                pass
        assert len(await engine.events(run_id, after=2**53)) == 0


async def test_an_infinite_float_is_refused_not_stored_as_null(store_url: str) -> None:
    # orjson writes inf and NaN as null: stored, they would replay to another state than the
    # live one. Refused as input; as an executor's output, a failed attempt (not retried).
    async def infinite(task: Task) -> Any:
        return {"x": float("inf")}

    wf = Workflow("inf", on_failure=FAIL, steps=[Step("s", executor="inf",
                                                      retry=Retry(attempts=3, backoff=0))])
    async with Engine(store_url, [wf], {"inf": infinite}) as engine:
        with pytest.raises(InvalidInput, match="infinite or NaN"):
            await engine.start("inf", {"x": float("nan")})
        run_id = await engine.start("inf", {})
        view = await engine.wait(run_id, timeout=5)
        assert view.status == "failed" and view.error_type == "unstorable_output"
