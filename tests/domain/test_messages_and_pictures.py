"""What a newcomer reads: definition errors that say what is wrong, and a graph that shows
every step, parallel branches included."""

from __future__ import annotations

import re

import pytest
from rulebound.domain.errors import DefinitionError
from rulebound.domain.explain import counted

from rulebound import FAIL, Parallel, Step, Workflow


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
