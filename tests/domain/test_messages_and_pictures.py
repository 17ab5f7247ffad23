"""What a newcomer reads: definition errors that say what is wrong, and a graph that shows
every step, parallel branches included."""

from __future__ import annotations

import re

import pytest
from rulebound.domain import events as ev
from rulebound.domain.errors import DefinitionError
from rulebound.domain.explain import counted
from rulebound.engine.audit import Report, check_decisions

from rulebound import FAIL, Limits, Parallel, Retry, Simulator, Step, Workflow


def task(name: str, **kw: object) -> Step:
    return Step(name, executor="x", **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(("steps", "message"), [
    (lambda: [task("a", next="b"), task("b"), task("a")],
     "duplicate step name 'a': used by two steps"),
    (lambda: [Parallel("p", branches=[task("b"), task("b")])],
     "duplicate step name 'b': used by two branches of 'p'"),
    (lambda: [task("a", next="p"), Parallel("p", branches=[task("a")])],
     "duplicate step name 'a': used by a step and a branch of 'p'"),
])
def test_a_duplicate_step_name_says_who_shares_it(steps: object, message: str) -> None:
    with pytest.raises(DefinitionError) as caught:
        Workflow("w", on_failure=FAIL, steps=steps())  # type: ignore[operator]
    assert str(caught.value) == f"Workflow 'w': {message}"


def test_the_mermaid_graph_draws_parallel_branches_inside_their_step() -> None:
    wf = Workflow("w", on_failure=FAIL, steps=[
        task("intake", next="enrich"),
        Parallel("enrich", branches=[task("crm"), task("orders")], next="answer"),
        task("answer")])
    text = wf.mermaid(taken=[("intake", "enrich"), ("enrich", "answer")])
    lines = [line.strip() for line in text.splitlines()]
    opened = lines.index('subgraph s_enrich["enrich (parallel)"]')
    closed = lines.index("end", opened)
    assert {'s_crm["crm"]', 's_orders["orders"]'} <= set(lines[opened:closed])
    # the step is still a node the edges reach and leave, and the taken edges are bold
    assert 's_intake -->|"next"| s_enrich' in lines
    assert 's_enrich -->|"next"| s_answer' in lines
    links = [line for line in lines if "-->" in line or "-.->" in line]
    bold = [int(n) for n in re.findall(r"linkStyle (\d+) ", text)]
    assert [links[i] for i in bold] == ['s_intake -->|"next"| s_enrich',
                                        's_enrich -->|"next"| s_answer']


@pytest.mark.parametrize(("n", "noun", "text"), [
    (0, "retry", "0 retries"), (1, "retry", "1 retry"), (2, "retry", "2 retries"),
    (1, "attempt", "1 attempt"), (3, "event", "3 events"), (2, "day", "2 days"),
])
def test_counts_agree_with_their_nouns(n: int, noun: str, text: str) -> None:
    assert counted(n, noun) == text


def _one_attempt_runs() -> dict[str, Simulator]:
    """A step that fails its one attempt, and one whose one attempt is abandoned past a cap
    of 0: the two decider messages that count attempts, each with a count of one."""
    def one_step(**limits: int) -> Workflow:
        return Workflow("w", on_failure=FAIL, limits=Limits(**limits), steps=[
            Step("s", executor="x", retry=Retry(attempts=1))])
    failed, abandoned = Simulator(one_step()), Simulator(one_step(max_abandoned=0))
    for sim in (failed, abandoned):
        sim.start()
        sim.start_attempt("s")
    failed.fail("s", "server_error", message="busy")
    abandoned.crash()
    return {"failed": failed, "abandoned": abandoned}


@pytest.mark.parametrize(("run", "message", "old"), [
    ("failed", "busy (1 attempt used)", "busy (1 attempts used)"),
    ("abandoned", "; 1 attempt of this visit was abandoned, more than max_abandoned=0",
     "; 1 attempts of this visit were abandoned, more than max_abandoned=0"),
])
def test_the_decider_counts_attempts_and_old_logs_in_the_old_wording_still_verify(
    run: str, message: str, old: str,
) -> None:
    sim = _one_attempt_runs()[run]
    at, failed = next((i, e) for i, e in enumerate(sim.history) if isinstance(e, ev.StepFailed))
    assert failed.message.endswith(message), failed.message

    def findings(text: str) -> list[str]:
        history = list(sim.history)
        history[at] = failed.model_copy(update={"message": text})
        report = Report()
        check_decisions(history, sim.definition, report)
        return [str(f) for f in report.findings]

    assert findings(failed.message) == []
    assert findings(failed.message.replace(message, old)) == []  # recorded before counted
    assert findings(failed.message.replace("1 attempt", "2 attempts")) != []  # an edit
