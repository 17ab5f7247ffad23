"""engine.testing: the property-testing aid users run on their own workflows."""

from __future__ import annotations

from datetime import timedelta

import pytest
from hypothesis import strategies as st
from rulebound.adapters.demo.workflow import Ticket, triage
from rulebound.domain import END, FAIL, Limits, Retry, Route, Simulator, Step, Workflow, field
from rulebound.domain import events as ev
from rulebound.engine.testing import InvariantViolated, check_history, check_workflow

loop = Workflow("loop", limits=Limits(max_cost=0.05, max_steps=30), on_failure="giveup",
                on_limit="giveup", steps=[
                    Step("try", executor="llm", cost=0.01, max_tokens=100, max_visits=5,
                         retry=Retry(attempts=3, backoff=0.5),
                         routes=[Route("try", when=field("try.again").is_true())], next=END),
                    Step("giveup", executor="fn", on_failure=FAIL)])


def test_the_demo_workflow_keeps_every_invariant() -> None:
    check_workflow(
        triage, inputs=st.builds(Ticket).map(lambda t: t.model_dump()),
        signals={"approval": st.fixed_dictionaries({"approved": st.booleans(),
                                                    "by": st.just("qa")})},
        max_examples=60)


def test_a_budgeted_loop_keeps_every_invariant() -> None:
    check_workflow(loop, outputs={"try": st.fixed_dictionaries({"again": st.booleans()})},
                   max_examples=100)


def _history() -> Simulator:
    sim = Simulator(loop)
    sim.start({})
    sim.start_attempt("try")
    sim.succeed("try", {"again": True}, ev.Usage(cost=0.01))
    return sim


def test_check_history_accepts_a_real_history() -> None:
    sim = _history()
    check_history(loop, sim.history, sim.state)


def test_check_history_catches_an_overspending_schedule() -> None:
    sim = _history()
    bad = ev.StepScheduled(at=sim.now, step="giveup", visit=1, attempt=1, not_before=sim.now,
                           reason="forged", max_cost=10.0)
    with pytest.raises(InvariantViolated, match="worst case"):
        check_history(loop, [*sim.history[:-1], bad])


def test_check_history_catches_a_decision_that_does_not_rederive() -> None:
    sim = _history()
    forged = [e.model_copy(update={"to_step": "giveup"}) if e.type == "TransitionTaken" else e
              for e in sim.history]
    with pytest.raises(InvariantViolated, match="re-deciding"):
        check_history(loop, forged)


def test_check_history_catches_events_after_the_end() -> None:
    sim = _history()
    sim.cancel("stop")
    late = ev.SignalReceived(at=sim.now + timedelta(seconds=1), name="x")
    with pytest.raises(InvariantViolated, match="after the run ended"):
        check_history(loop, [*sim.history, late])


def test_a_history_cut_after_some_of_its_decisions_is_caught() -> None:
    from pathlib import Path

    from rulebound.engine import codec

    from tests.histories.golden_workflows import SCRIPTS

    workflow, _script = SCRIPTS["linear_chain"]
    lines = (Path(__file__).resolve().parents[1] / "histories" / "linear_chain.jsonl"
             ).read_bytes().splitlines()
    events = [codec.decode(line) for line in lines]
    assert events[-1].type == "RunCompleted" and events[-2].type == "TransitionTaken"
    check_history(workflow, events)  # whole: fine
    with pytest.raises(InvariantViolated, match=r"re-deciding gives .*'RunCompleted'\]"):
        check_history(workflow, events[:-1])  # the run's end was decided but is missing
