"""An attempt cut off by an engine stop is the engine's fault, not the step's: it is re-run
without using a retry and whatever `Retry.on` says, up to `max_abandoned` per visit. Runs
recorded before that rule keep the rule they ran under."""

from __future__ import annotations

import pytest
from rulebound.domain import FAIL, Limits, Map, Retry, Simulator, Step, Workflow
from rulebound.domain import events as ev
from rulebound.domain.decider import advance, decide
from rulebound.domain.simulator import EPOCH
from rulebound.domain.state import replay
from rulebound.engine.testing import check_history

# The README's policy: retries only for the kinds it lists, "abandoned" not among them.
README_RETRY = Retry(attempts=3, on=("rate_limited", "server_error"))


def one_step(retry: Retry = README_RETRY, limits: Limits = Limits(), **step: object) -> Workflow:
    return Workflow("w", on_failure=FAIL, limits=limits,
                    steps=[Step("s", executor="x", retry=retry, **step)])  # type: ignore[arg-type]


def scheduled(sim: Simulator) -> list[ev.StepScheduled]:
    return [e for e in sim.history if isinstance(e, ev.StepScheduled)]


def crash_running(sim: Simulator) -> None:
    for key in sim.ready():
        sim.start_attempt(key)
    sim.crash()


def test_a_crash_under_the_readme_policy_re_runs_the_step_at_once() -> None:
    sim = Simulator(one_step())
    sim.start()
    crash_running(sim)
    rerun = scheduled(sim)[-1]
    assert (rerun.attempt, rerun.not_before) == (2, sim.now)  # next number, no backoff
    assert rerun.reason.startswith("re-run 1/3 of abandoned attempt 1")
    assert sim.state.steps["s"].abandoned == 1
    assert sim.state.retries == 0  # a re-run is not a retry
    sim.start_attempt("s")
    sim.succeed("s", {"ok": True})
    assert sim.state.status == "completed"
    check_history(sim.definition, sim.history, sim.state)


def test_abandonments_leave_every_retry_to_reported_failures() -> None:
    sim = Simulator(one_step())
    sim.start()
    for _ in range(3):  # crashes before and between the failures
        crash_running(sim)
        sim.start_attempt("s")
        sim.fail("s", "server_error")
        sim.advance_time(120)
    assert sim.state.status == "failed"
    failed = next(e for e in sim.history if isinstance(e, ev.StepFailed))
    assert failed.error_type == "server_error"
    assert failed.message.endswith("(3 attempts used)")
    reasons = [e.reason for e in scheduled(sim)]
    assert [r.split(" after")[0] for r in reasons if r.startswith("retry")] == [
        "retry 2/3", "retry 3/3"]
    assert sim.state.steps["s"].attempt == 6  # attempt numbers count every executor call
    check_history(sim.definition, sim.history, sim.state)


@pytest.mark.parametrize(("limit", "own", "cap"), [(3, None, 3), (1, None, 1), (3, 0, 0),
                                                   (0, 2, 2)])
def test_past_the_cap_the_step_fails_as_abandoned_through_its_failure_path(
    limit: int, own: int | None, cap: int,
) -> None:
    wf = Workflow("w", on_failure="cleanup", limits=Limits(max_abandoned=limit), steps=[
        Step("s", executor="x", retry=Retry(attempts=2, max_abandoned=own)),
        Step("cleanup", executor="x", on_failure=FAIL)])
    sim = Simulator(wf)
    sim.start()
    for _ in range(cap + 1):
        assert sim.state.steps["s"].status == "scheduled"
        crash_running(sim)
    failed = next(e for e in sim.history if isinstance(e, ev.StepFailed))
    assert (failed.error_type, failed.step) == ("abandoned", "s")
    assert f"more than max_abandoned={cap}" in failed.message
    taken = [e for e in sim.history if isinstance(e, ev.TransitionTaken)][-1]
    assert (taken.to_step, taken.condition) == ("cleanup", "on_failure (abandoned)")
    check_history(wf, sim.history, sim.state)


def test_a_re_run_is_reserved_against_the_budget() -> None:
    # Worst case $0.4 per attempt, budget $1: the abandoned attempt is charged $0.4, the
    # first re-run is reserved ($0.8 spoken for), a second would break the budget.
    sim = Simulator(one_step(limits=Limits(max_cost=1.0), cost=0.4))
    sim.start()
    crash_running(sim)
    assert sim.state.reserved_cost == pytest.approx(0.4)
    assert sim.state.cost + sim.state.reserved_cost == pytest.approx(0.8)
    crash_running(sim)
    limit = next(e for e in sim.history if isinstance(e, ev.LimitReached))
    assert limit.limit == "cost"
    failed = next(e for e in sim.history if isinstance(e, ev.StepFailed))
    assert failed.error_type == "cost_limit"
    assert sim.state.cost <= 1.0 and sim.state.status == "failed"


def test_a_map_item_is_re_run_without_touching_its_siblings() -> None:
    wf = Workflow("m", on_failure=FAIL, steps=[
        Map("each", over="input.items", step=Step("one", executor="x", retry=README_RETRY),
            max_concurrency=2)])
    sim = Simulator(wf)
    sim.start({"items": [1, 2]})
    crash_running(sim)
    assert {e.step: e.attempt for e in scheduled(sim)[-2:]} == {"one[0]": 2, "one[1]": 2}
    sim.run_to_end()
    assert sim.state.status == "completed"
    check_history(wf, sim.history, sim.state)


def test_the_cap_is_hash_neutral_at_its_default_and_part_of_the_hash_otherwise() -> None:
    base = one_step(retry=Retry()).hash
    assert one_step(retry=Retry(max_abandoned=None), limits=Limits(max_abandoned=3)).hash == base
    assert one_step(retry=Retry(max_abandoned=3)).hash != base
    assert one_step(retry=Retry(), limits=Limits(max_abandoned=1)).hash != base


def _legacy_start(wf: Workflow) -> Simulator:
    """A run as an engine before `max_abandoned` recorded it (limits without the key): its
    first batch, RunStarted and the decisions it called for, picked up by the simulator."""
    limits = wf.limits.model_dump()
    del limits["max_abandoned"]
    started = ev.RunStarted(at=EPOCH, workflow=wf.name, definition_hash=wf.hash,
                            limits=limits, seed=0)
    decided, state = advance(wf, replay([started]), EPOCH)
    return Simulator(wf, now=EPOCH, state=state, history=[started, *decided])


def test_runs_started_before_the_rule_keep_the_rule_they_ran_under() -> None:
    sim = _legacy_start(one_step())
    crash_running(sim)
    failed = next(e for e in sim.history if isinstance(e, ev.StepFailed))
    assert failed.error_type == "abandoned"  # "abandoned" is not in Retry.on: no retry
    assert "not retryable" in failed.message
    state = replay(sim.history)
    assert "abandoned" not in state.to_dict()["steps"]["s"]  # serialises as it always did
    assert decide(sim.definition, state, sim.now) == []
