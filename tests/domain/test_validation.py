"""Definitions are validated when built: every mistake is a DefinitionError naming the element."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel
from rulebound.domain import (
    END,
    FAIL,
    DefinitionError,
    Limits,
    Map,
    Parallel,
    Retry,
    Route,
    Step,
    WaitForSignal,
    Workflow,
    field,
)


class Label(BaseModel):
    """A label."""

    category: str
    score: float = 0.0


class Items(BaseModel):
    items: list[str]


class Ticket(BaseModel):
    text: str


def wf(*steps: Any, **kw: Any) -> Workflow:
    kw.setdefault("on_failure", FAIL)
    return Workflow("w", steps=list(steps), **kw)


def task(name: str, **kw: Any) -> Step:
    return Step(name, executor=kw.pop("executor", "x"), **kw)


INVALID: list[tuple[str, Callable[[], Any], str]] = [
    ("empty name", lambda: Workflow("", steps=[task("a")], on_failure=FAIL), "name"),
    ("no steps", lambda: Workflow("w", steps=[], on_failure=FAIL), "steps"),
    ("duplicate step", lambda: wf(task("a", next="a2"), task("a2"), task("a")), "'a'"),
    ("duplicate branch name", lambda: wf(
        Parallel("p", branches=[task("b"), task("b")])), "'b'"),
    ("branch named like a step", lambda: wf(
        task("a", next="p"), Parallel("p", branches=[task("a")])), "'a'"),
    ("map item named like a step", lambda: wf(
        task("src", output=Items, next="m"), Map("m", over="src.items", step=task("src"))),
     "'src'"),
    ("unknown start", lambda: wf(task("a"), start="zzz"), "'zzz'"),
    ("unknown next", lambda: wf(task("a", next="nowhere")), "'nowhere'"),
    ("unknown route target", lambda: wf(
        task("a", output=Label, routes=[Route("ghost", when=field("a.category") == "x")])),
     "'ghost'"),
    ("unknown on_failure", lambda: wf(task("a", on_failure="oops")), "'oops'"),
    ("unknown workflow on_failure", lambda: Workflow("w", steps=[task("a")],
                                                     on_failure="nope"), "'nope'"),
    ("unknown on_limit", lambda: wf(task("a"), on_limit="missing"), "'missing'"),
    ("on_limit is END", lambda: wf(task("a"), on_limit=END), "on_limit"),
    ("unknown on_timeout", lambda: wf(
        WaitForSignal("s", signal="go", timeout=5, on_timeout="later")), "'later'"),
    ("route to a branch", lambda: wf(
        Parallel("p", branches=[task("b1")], next="b1")), "'b1'"),
    ("unreachable step", lambda: wf(task("a"), task("island")), "'island'"),
    ("failure with no path", lambda: Workflow("w", steps=[task("a")]), "'a'"),
    ("cycle without visit limit", lambda: wf(task("a", next="b"), task("b", next="a")),
     "'a'"),
    ("self loop without visit limit", lambda: wf(
        task("a", output=Label, routes=[Route("a", when=field("a.category") == "x")])), "'a'"),
    ("failure loop without visit limit", lambda: wf(
        task("a", on_failure="b"), task("b", next="a", on_failure=FAIL)), "'a'"),
    ("zero timeout", lambda: task("a", timeout=0), "timeout"),
    ("negative timeout", lambda: task("a", timeout=-1), "timeout"),
    ("infinite timeout", lambda: task("a", timeout=math.inf), "timeout"),
    ("signal timeout zero", lambda: WaitForSignal("s", signal="go", timeout=0), "timeout"),
    ("no retry attempts", lambda: Retry(attempts=0), "attempts"),
    ("unbounded retries", lambda: Retry(attempts=10_000), "attempts"),
    ("infinite backoff", lambda: Retry(backoff=math.inf), "retry timing"),
    ("negative cost", lambda: task("a", cost=-0.1), "cost"),
    ("infinite cost limit", lambda: Limits(max_cost=math.inf), "limit"),
    ("nan deadline", lambda: Limits(deadline=math.nan), "deadline"),
    ("zero max_steps", lambda: Limits(max_steps=0), "max_steps"),
    ("zero visits", lambda: task("a", max_visits=0), "max_visits"),
    ("condition reads a missing output field", lambda: wf(
        task("a", output=Label, routes=[Route("b", when=field("a.colour") == "red")]),
        task("b")), "colour"),
    ("condition reads an unknown step", lambda: wf(
        task("a", routes=[Route("b", when=field("ghost.x") == 1)]), task("b")), "'ghost'"),
    ("input reads a missing input field", lambda: wf(
        task("a", input={"t": "input.body"}), input_schema=Ticket), "body"),
    ("input reads an unknown step", lambda: wf(task("a", input="nope.x")), "'nope'"),
    ("item used outside a map", lambda: wf(task("a", input={"x": "item"})), "item"),
    ("map over a missing field", lambda: wf(
        task("src", output=Items, next="m"), Map("m", over="src.things", step=task("each"))),
     "things"),
    ("empty parallel", lambda: Parallel("p", branches=[]), "branches"),
    ("branch with its own route", lambda: wf(
        Parallel("p", branches=[task("b", next="p")])), "'b'"),
    ("map item with on_failure", lambda: wf(
        task("src", output=Items, next="m"),
        Map("m", over="src.items", step=task("each", on_failure=FAIL))), "'each'"),
    ("zero map concurrency", lambda: Map("m", over="input.x", step=task("e"),
                                         max_concurrency=0), "max_concurrency"),
    ("reserved step name", lambda: task("input"), "reserved"),
    ("invalid step name", lambda: task("has space"), "has space"),
    ("empty executor", lambda: Step("a", executor=""), "executor"),
    ("wrong type", lambda: Step("a", executor=3), "executor"),  # type: ignore[arg-type]
    ("unknown keyword", lambda: Step("a", executor="x", retries=3), "retries"),
    ("two positional args", lambda: Step("a", "x"), "positional"),
]


def test_the_table_is_large_enough() -> None:
    assert len(INVALID) >= 25
    assert len({name for name, _, _ in INVALID}) == len(INVALID)


@pytest.mark.parametrize(("build", "names"), [(b, n) for _, b, n in INVALID],
                         ids=[name for name, _, _ in INVALID])
def test_invalid_definitions_raise_a_definition_error_naming_the_element(
    build: Callable[[], Any], names: str,
) -> None:
    with pytest.raises(DefinitionError) as caught:
        build()
    assert names in str(caught.value)


def test_valid_definitions_build() -> None:
    wf(task("a"))
    wf(task("a", output=Label, max_visits=3,
            routes=[Route("a", when=(field("a.score") < 0.5) & (field("a.category") != "x"))],
            next="b"), task("b", on_failure=END))
    wf(task("src", output=Items, next="m"),
       Map("m", over="src.items", step=task("each", input={"x": "item", "i": "index"}),
           next="p"),
       Parallel("p", branches=[task("p1"), task("p2")], on_branch_failure="collect",
                next="s"),
       WaitForSignal("s", signal="ok", timeout=60, on_timeout="late", next=END),
       task("late", delay=5.0), on_limit="late")


# --- a prompt names only fields its step's input has ------------------------------------


def llm(name: str, prompt: str, **kw: Any) -> Step:
    return Step(name, executor="llm", config={"prompt": prompt}, **kw)


PROMPT_MISTAKES: list[tuple[str, Callable[[], Workflow], str]] = [
    ("a field the run's input lacks", lambda: wf(
        llm("a", "Answer {question}"), input_schema=Ticket),
     "names {question}, which its input does not have: it gets the run's input, and Ticket "
     "has no field 'question'"),
    ("an earlier output the step is not given", lambda: wf(
        task("classify", output=Label, next="answer"),
        llm("answer", "Answer {text} as a {category} question"), input_schema=Ticket),
     "names {category}"),
    ("{input.x} for a field of the run's input", lambda: wf(
        llm("a", "Answer {input.text}"), input_schema=Ticket), "names {input.text}"),
    ("a key the input mapping lacks", lambda: wf(
        llm("a", "Answer {text} as {label}", input={"text": "input.text"})),
     "its input={...} has only 'text'"),
    ("a field the mapped output lacks", lambda: wf(
        task("classify", output=Label, next="answer"),
        llm("answer", "{text} is {label.colour}",
            input={"text": "input.text", "label": "classify"})),
     "'label' is 'classify', which has no field 'colour'"),
    ("a field of an input that is one string", lambda: wf(
        llm("a", "Answer {text}", input="input.text"), input_schema=Ticket),
     "its input 'input.text' is one value, which a prompt names {input}"),
    ("a field the input path's model lacks", lambda: wf(
        task("classify", output=Label, next="answer"),
        llm("answer", "Say {text}", input="classify")), "its input 'classify' has no field"),
    ("a parallel branch", lambda: wf(
        Parallel("p", branches=[llm("b", "Answer {body}")]), input_schema=Ticket),
     "step 'b' names {body}"),
    ("a map item step's mapping", lambda: wf(
        task("src", output=Items, next="m"),
        Map("m", over="src.items", step=llm("each", "Say {it}", input={"x": "item"}))),
     "names {it}"),
]


@pytest.mark.parametrize(("build", "message"), [(b, m) for _, b, m in PROMPT_MISTAKES],
                         ids=[name for name, _, _ in PROMPT_MISTAKES])
def test_a_prompt_naming_a_field_its_input_lacks_is_a_definition_error(
    build: Callable[[], Workflow], message: str,
) -> None:
    with pytest.raises(DefinitionError) as caught:
        build()
    assert message in str(caught.value)


def test_prompts_whose_fields_the_input_has_or_may_have_build() -> None:
    wf(llm("a", "Answer {text}"), input_schema=Ticket)  # the run's input
    wf(task("classify", output=Label, next="answer"),  # a mapping, nested fields
       llm("answer", "{text} is {label.category} ({label.score})",
           input={"text": "input.text", "label": "classify"}), input_schema=Ticket)
    wf(llm("a", "Answer {input}", input="input.text"), input_schema=Ticket)  # one value
    wf(task("classify", output=Label, next="answer"),
       llm("answer", "Say {category}", input="classify"))  # a path to a model
    wf(llm("a", "Answer {anything}"))  # no input_schema: the run's input is not known
    wf(task("b", next="a"), llm("a", "Answer {anything.x}", input="b"))  # b has no output
    wf(llm("a", "Answer {x.y}", input={"x": "error"}))  # error: shape not declared
    wf(task("src", output=Items, next="m"),  # a map item's type is not declared
       Map("m", over="src.items", step=llm("each", "Say {anything}")))
    wf(Step("a", executor="llm", config={"template": "{nope}"}), input_schema=Ticket)


# --- fuzzing: random definitions never raise anything but DefinitionError ----------------

names = st.sampled_from(["a", "b", "c", "d", "input", "a b", "", "x" * 70, "ok-1", "_z"])
numbers = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-5, 10**6),
                    st.none())
targets = st.one_of(names, st.sampled_from([END, FAIL, "ghost"]), st.none())
conditions = st.builds(lambda p, v: field(p) == v, st.sampled_from(
    ["a.category", "b.x", "input.text", "ghost.y", "item", "error.type"]),
    st.one_of(st.text(max_size=3), st.integers()))
models = st.sampled_from([None, Label, Items])


@st.composite
def random_step(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(["task", "task", "signal", "parallel", "map"]))
    spec: dict[str, Any] = {"kind": kind, "name": draw(names)}
    if draw(st.booleans()):
        spec["next"] = draw(targets)
    if draw(st.booleans()):
        spec["on_failure"] = draw(targets)
    if draw(st.booleans()):
        spec["max_visits"] = draw(numbers)
    if draw(st.booleans()):
        spec["routes"] = [(draw(targets), draw(conditions)) for _ in range(draw(
            st.integers(0, 2)))]
    if kind in ("task", "signal"):
        spec["timeout"] = draw(numbers)
        spec["output"] = draw(models)
    if kind == "task":
        spec["cost"] = draw(numbers)
        spec["attempts"] = draw(numbers)
        spec["input"] = draw(st.one_of(st.none(), st.sampled_from(
            ["input.text", "a.category", "item", "ghost"])))
    return spec


def _build(spec: dict[str, Any]) -> Any:
    kind = spec.pop("kind")
    routes = [Route(t, when=c) for t, c in spec.pop("routes", []) if t is not None]
    common = {k: v for k, v in spec.items() if k in ("name", "next", "on_failure",
                                                     "max_visits") and v is not None}
    if routes:
        common["routes"] = routes
    if kind == "task":
        return Step(executor="x", timeout=spec.get("timeout") or 1, output=spec.get("output"),
                    cost=spec.get("cost") or 0, input=spec.get("input"),
                    retry=Retry(attempts=spec.get("attempts") or 1), **common)
    if kind == "signal":
        return WaitForSignal(signal="go", timeout=spec.get("timeout") or 1,
                             output=spec.get("output"), **common)
    if kind == "parallel":
        return Parallel(branches=[Step("br_" + str(abs(hash(common["name"])) % 97),
                                       executor="x")], **common)
    return Map(over="a.items", step=Step("it_" + str(abs(hash(common["name"])) % 97),
                                         executor="x"), **common)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs=st.lists(random_step(), min_size=0, max_size=5),
       on_failure=targets, limits=st.fixed_dictionaries({
           "max_cost": numbers, "max_steps": numbers, "deadline": numbers}))
def test_random_definitions_raise_nothing_but_definition_error(
    specs: list[dict[str, Any]], on_failure: Any, limits: dict[str, Any],
) -> None:
    try:
        steps = [_build(dict(s)) for s in specs]
        Workflow("fuzz", steps=steps, on_failure=on_failure,
                 limits=Limits(**{k: v for k, v in limits.items() if v is not None}))
    except DefinitionError:
        pass


# --- hash and graph --------------------------------------------------------------------


def base(**changes: Any) -> Workflow:
    step_kw: dict[str, Any] = {"output": Label, "timeout": 10, "cost": 0.01,
                               "retry": Retry(attempts=3)}
    step_kw.update(changes.pop("step", {}))
    return Workflow("h", description=changes.pop("description", "v1"), on_failure=FAIL,
                    steps=[Step("a", executor=changes.pop("executor", "x"),
                                routes=[Route("b", when=field("a.category") == changes.pop(
                                    "value", "billing"))], next="b", **step_kw),
                           Step("b", executor="y", description=changes.pop("bdesc", ""))],
                    **changes)


class LabelRenamedDocs(BaseModel):
    """Completely different docs."""

    category: str
    score: float = 0.0


class LabelChangedType(BaseModel):
    category: int
    score: float = 0.0


def test_the_hash_ignores_cosmetics_and_tracks_behaviour() -> None:
    h = base().hash
    assert base(description="another description").hash == h
    assert base(bdesc="explains b").hash == h
    assert base(step={"output": LabelRenamedDocs}).hash == h  # titles and docstrings only
    for changed in (base(step={"timeout": 11}), base(step={"retry": Retry(attempts=4)}),
                    base(value="sales"), base(executor="z"), base(step={"cost": 0.02}),
                    base(limits=Limits(max_cost=2.0)), base(step={"output": LabelChangedType})):
        assert changed.hash != h


def test_the_hash_is_stable_across_processes() -> None:
    code = ("from tests.domain.test_validation import base; print(base().hash)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={"PYTHONHASHSEED": "12345", "PATH": "/usr/bin"},
                         cwd=str(__import__("pathlib").Path(__file__).parents[2]))
    assert out.stdout.strip() == base().hash


def test_step_order_is_cosmetic_when_start_is_explicit() -> None:
    a = Workflow("o", start="a", on_failure=FAIL,
                 steps=[Step("a", executor="x", next="b"), Step("b", executor="y")])
    b = Workflow("o", start="a", on_failure=FAIL,
                 steps=[Step("b", executor="y"), Step("a", executor="x", next="b")])
    assert a.hash == b.hash


def test_graph_export_has_every_node_and_edge() -> None:
    w = base(on_limit="b")
    graph = w.graph()
    json.dumps(graph)
    assert {n["id"] for n in graph["nodes"]} == {"a", "b"}
    edges = {(e["from"], e["to"], e["kind"]) for e in graph["edges"]}
    assert ("a", "b", "route") in edges
    assert ("a", "b", "next") in edges
    assert ("b", END, "next") in edges
    assert ("a", FAIL, "failure") in edges
    assert ("*", "b", "limit") in edges
    text = w.mermaid(taken=[("a", "b")])
    assert text.startswith("flowchart TD")
    assert "a.category == 'billing'" in text
    assert "linkStyle" in text
    assert "linkStyle" not in w.mermaid()
