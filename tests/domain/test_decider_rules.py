"""The decider's rules, one example each, through the clock-free Simulator."""

from __future__ import annotations

from datetime import timedelta

import pytest
from pydantic import BaseModel
from rulebound.domain import (
    END,
    FAIL,
    Limits,
    Map,
    Parallel,
    Retry,
    Route,
    Simulator,
    Step,
    WaitForSignal,
    Workflow,
    decide,
    field,
)
from rulebound.domain import events as ev


class Label(BaseModel):
    category: str


def types(sim: Simulator) -> list[str]:
    return [e.type for e in sim.history]


def last(sim: Simulator, kind: type[ev.Event]) -> ev.Event:
    return next(e for e in reversed(sim.history) if isinstance(e, kind))


def test_a_route_records_the_condition_and_the_values_it_read() -> None:
    wf = Workflow("r", on_failure=FAIL, steps=[
        Step("c", executor="x", output=Label,
             routes=[Route("a", when=field("c.category") == "a")], next="b"),
        Step("a", executor="x"), Step("b", executor="x")])
    sim = Simulator(wf)
    sim.start()
    sim.start_attempt("c")
    sim.succeed("c", {"category": "zzz"})
    taken = last(sim, ev.TransitionTaken)
    assert (taken.to_step, taken.condition, taken.values) == (
        "b", "otherwise", {"c.category": "zzz"})


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_backoff_jitter_is_seeded_and_bounded(seed: int) -> None:
    policy = Retry(attempts=5, backoff=2.0, multiplier=3.0, max_backoff=100, jitter=0.25)
    wf = Workflow("j", on_failure=FAIL, steps=[Step("s", executor="x", retry=policy)])
    delays = []
    for _ in range(2):
        sim = Simulator(wf, seed=seed)
        sim.start()
        sim.start_attempt("s")
        sim.fail("s", "server_error")
        scheduled = last(sim, ev.StepScheduled)
        delays.append((scheduled.not_before - scheduled.at).total_seconds())
    assert delays[0] == delays[1]  # same seed, same jitter
    assert 2.0 * 0.75 <= delays[0] <= 2.0 * 1.25
    assert policy.delay(3, seed, "k") == policy.delay(3, seed, "k")
    assert 18.0 * 0.75 <= policy.delay(3, seed, "k") <= 18.0 * 1.25


def test_a_retry_after_hint_is_honoured_and_capped() -> None:
    wf = Workflow("h", on_failure=FAIL, steps=[
        Step("s", executor="x", retry=Retry(attempts=3, backoff=0, max_retry_after=10))])
    sim = Simulator(wf)
    sim.start()
    sim.start_attempt("s")
    sim.fail("s", "rate_limited", retry_after=5)
    assert last(sim, ev.StepScheduled).not_before == sim.now + timedelta(seconds=5)
    sim.advance_time(5)
    sim.start_attempt("s")
    sim.fail("s", "rate_limited", retry_after=3600)  # capped at 10 s
    assert last(sim, ev.StepScheduled).not_before == sim.now + timedelta(seconds=10)


def test_kinds_outside_the_policy_and_permanent_errors_do_not_retry() -> None:
    wf = Workflow("k", on_failure=FAIL, steps=[
        Step("s", executor="x", retry=Retry(attempts=3, on=("timeout",)))])
    sim = Simulator(wf)
    sim.start()
    sim.start_attempt("s")
    sim.fail("s", "server_error")
    assert sim.state.status == "failed"
    assert "not retryable" in last(sim, ev.StepFailed).message
    sim = Simulator(wf)
    sim.start()
    sim.start_attempt("s")
    sim.fail("s", "timeout", retryable=False)
    assert sim.state.error_type == "timeout"


def test_output_the_log_cannot_hold_is_never_retried() -> None:
    """The same executor answer would fail the same way: "unstorable_output" goes straight to
    the failure path, even marked retryable and under a policy that retries every kind."""
    wf = Workflow("u", on_failure="fallback", steps=[
        Step("s", executor="x", retry=Retry(attempts=5, on=None)),
        Step("fallback", executor="x", on_failure=FAIL)])
    sim = Simulator(wf)
    sim.start()
    sim.start_attempt("s")
    sim.fail("s", "unstorable_output", retryable=True, message="output cannot be stored")
    failed = last(sim, ev.StepFailed)
    assert (failed.error_type, sim.state.steps["s"].attempt) == ("unstorable_output", 1)
    assert "not retryable" in failed.message
    assert last(sim, ev.TransitionTaken).to_step == "fallback"


def test_a_retry_the_budget_cannot_afford_fails_the_step() -> None:
    wf = Workflow("b", on_failure=FAIL, limits=Limits(max_cost=0.15), steps=[
        Step("s", executor="x", cost=0.1, retry=Retry(attempts=5, backoff=0))])
    sim = Simulator(wf)
    sim.start()
    sim.start_attempt("s")
    sim.fail("s", usage=ev.Usage(cost=0.08))
    limit = last(sim, ev.LimitReached)
    assert (limit.limit, limit.step) == ("cost", "s")
    assert last(sim, ev.StepFailed).error_type == "cost_limit"


def test_a_visit_limit_takes_the_on_limit_path_once() -> None:
    wf = Workflow("v", on_failure=FAIL, on_limit="handoff", steps=[
        Step("loop", executor="x", max_visits=2,
             routes=[Route("loop", when=field("loop.again").is_true())]),
        Step("handoff", executor="h")])
    sim = Simulator(wf)
    sim.start()
    for _ in range(2):
        sim.start_attempt("loop")
        sim.succeed("loop", {"again": True})
    limit = last(sim, ev.LimitReached)
    assert (limit.limit, limit.limit_value, limit.step) == ("visits", 2, "loop")
    assert last(sim, ev.TransitionTaken).to_step == "handoff"
    sim.start_attempt("handoff")
    sim.succeed("handoff", {})
    assert sim.state.status == "completed"


def test_the_steps_limit_fails_the_run_without_on_limit() -> None:
    wf = Workflow("s", on_failure=FAIL, limits=Limits(max_steps=2), steps=[
        Step("a", executor="x", next="b"), Step("b", executor="x", next="c"),
        Step("c", executor="x")])
    sim = Simulator(wf)
    sim.start()
    sim.run_to_end()
    assert types(sim)[-2:] == ["LimitReached", "RunFailed"]
    assert sim.state.error_type == "steps_limit"


def test_the_deadline_ends_the_run_when_its_timer_fires() -> None:
    wf = Workflow("d", on_failure=FAIL, limits=Limits(deadline=10), steps=[
        Step("s", executor="x")])
    sim = Simulator(wf)
    sim.start()
    sim.start_attempt("s")
    sim.advance_time(11)
    assert types(sim)[-3:] == ["TimerFired", "LimitReached", "RunFailed"]
    assert sim.state.error_type == "deadline"


def test_a_signal_sent_early_waits_in_the_inbox() -> None:
    wf = Workflow("w", on_failure=FAIL, steps=[
        Step("prep", executor="x", next="wait"),
        WaitForSignal("wait", signal="go", timeout=60)])
    sim = Simulator(wf)
    sim.start()
    sim.signal("go", {"n": 1})
    sim.start_attempt("prep")
    sim.succeed("prep", {})
    assert sim.state.status == "completed"
    assert sim.state.output == {"n": 1}
    assert sim.state.inbox == ()


def test_a_signal_timeout_takes_the_timeout_path() -> None:
    wf = Workflow("t", on_failure=FAIL, steps=[
        WaitForSignal("wait", signal="go", timeout=60, on_timeout="late"),
        Step("late", executor="x")])
    sim = Simulator(wf)
    sim.start()
    sim.advance_time(59)
    assert sim.state.steps["wait"].status == "waiting"
    sim.advance_time(2)
    taken = last(sim, ev.TransitionTaken)
    assert (taken.to_step, taken.condition) == ("late", "on_timeout (signal_timeout)")


def test_cancel_names_the_attempts_in_flight() -> None:
    wf = Workflow("c", on_failure=FAIL, steps=[
        Parallel("p", branches=[Step("a", executor="x"), Step("b", executor="x")])])
    sim = Simulator(wf)
    sim.start()
    sim.start_attempt("a")
    sim.cancel("stop")
    cancelled = last(sim, ev.RunCancelled)
    assert cancelled.in_flight == ["a"]
    assert decide(wf, sim.state, sim.now + timedelta(days=1)) == []


@pytest.mark.parametrize(("policy", "status", "output"), [
    ("collect", "completed", {"a": {"ok": 1}, "b": {"error": {
        "step": "b", "type": "client_error", "message": "failed (not retryable)"}}}),
    ("fail", "failed", None),
])
def test_a_failed_branch_follows_the_join_policy(policy: str, status: str,
                                                 output: object) -> None:
    wf = Workflow("p", on_failure=FAIL, steps=[
        Parallel("p", on_branch_failure=policy,
                 branches=[Step("a", executor="x"), Step("b", executor="x")])])
    sim = Simulator(wf)
    sim.start()
    sim.start_attempt("a")
    sim.start_attempt("b")
    sim.fail("b", "client_error", retryable=False)
    assert sim.state.steps["p"].status == "running"  # waits for every branch
    sim.succeed("a", {"ok": 1})
    assert sim.state.status == status
    assert sim.state.output == output


@pytest.mark.parametrize(("items", "status", "error"), [
    ([], "completed", None), ("not a list", "failed", "invalid_input"),
    (list(range(5)), "failed", "too_many_items"),
])
def test_map_edge_cases(items: object, status: str, error: str | None) -> None:
    wf = Workflow("m", on_failure=FAIL, steps=[
        Map("m", over="input.items", step=Step("each", executor="x"), max_items=4)])
    sim = Simulator(wf)
    sim.start({"items": items})
    sim.run_to_end()
    assert sim.state.status == status
    assert sim.state.error_type == error


def test_map_keeps_input_order_and_its_concurrency() -> None:
    wf = Workflow("m", on_failure=FAIL, steps=[
        Map("m", over="input.items", step=Step("each", executor="x", input="item"),
            max_concurrency=2, next=END)])
    sim = Simulator(wf)
    sim.start({"items": ["a", "b", "c", "d"]})
    for key in sim.ready():
        sim.start_attempt(key)
    assert sorted(sim.running()) == ["each[0]", "each[1]"]
    sim.succeed("each[1]", "B")
    for key in sim.ready():
        sim.start_attempt(key)
    sim.run_to_end({"each": "?"})
    assert sim.state.output == ["?", "B", "?", "?"]
    assert sim.state.steps["each[2]"].status == "completed"


def test_an_attempt_is_never_scheduled_beyond_the_budget() -> None:
    wf = Workflow("n", on_failure=FAIL, limits=Limits(max_cost=0.05), steps=[
        Step("big", executor="x", cost=0.06)])
    sim = Simulator(wf)
    sim.start()
    assert not any(isinstance(e, ev.StepScheduled) for e in sim.history)
    assert sim.state.error_type == "cost_limit"
