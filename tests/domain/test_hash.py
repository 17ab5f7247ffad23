"""The definition hash: cosmetic changes keep it, behavioural ones change it.

Regressions pinned here: fields *named* title, description or examples are fields (only the
JSON-schema keywords of those names are cosmetic), and parallel branches are hashed in their
declared order, which is the order the decider schedules them in.
"""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel, ConfigDict, Field, create_model
from rulebound.domain import END, FAIL, Parallel, Simulator, Step, Workflow
from rulebound.engine.testing import InvariantViolated, check_history

NAMES = ("title", "description", "examples")


def with_output(model: type[BaseModel] | None, *,
                input_schema: type[BaseModel] | None = None) -> Workflow:
    return Workflow("h", on_failure=FAIL, input_schema=input_schema,
                    steps=[Step("a", executor="x", output=model)])


def model(name: str, **fields: Any) -> type[BaseModel]:
    return create_model(name, **fields)


@pytest.mark.parametrize("name", NAMES)
def test_a_field_named_like_a_keyword_changing_type_changes_the_hash(name: str) -> None:
    as_str = model("Out", **{name: (str, ...)})
    as_int = model("Out", **{name: (int, ...)})
    assert with_output(as_str).hash != with_output(as_int).hash
    assert with_output(None, input_schema=as_str).hash != with_output(
        None, input_schema=as_int).hash


@pytest.mark.parametrize("name", NAMES)
def test_adding_a_field_named_like_a_keyword_changes_the_hash(name: str) -> None:
    plain = model("Out", label=(str, ...))
    more = model("Out", label=(str, ...), **{name: (str | None, None)})
    required = model("Out", label=(str, ...), **{name: (str, ...)})
    hashes = {with_output(plain).hash, with_output(more).hash, with_output(required).hash}
    assert len(hashes) == 3


@pytest.mark.parametrize("name", NAMES)
def test_a_nested_field_named_like_a_keyword_counts_too(name: str) -> None:
    inner_str = model("Inner", **{name: (str, ...)})
    inner_int = model("Inner", **{name: (int, ...)})
    outer_str = model("Out", inner=(inner_str, ...), many=(list[inner_str], []))
    outer_int = model("Out", inner=(inner_int, ...), many=(list[inner_int], []))
    assert with_output(outer_str).hash != with_output(outer_int).hash


def test_defaults_are_behaviour_even_when_they_hold_keyword_names() -> None:
    one = model("Out", meta=(dict[str, int], {"title": 1}))
    two = model("Out", meta=(dict[str, int], {"title": 2}))
    assert with_output(one).hash != with_output(two).hash


class Documented(BaseModel):
    """A docstring becomes the schema's description."""

    model_config = ConfigDict(title="A custom title")

    title: str = Field(title="The title", description="What the ticket is called",
                       examples=["Refund"])
    description: int = Field(description="Counts", examples=[1, 2])
    examples: list[str] = Field(default_factory=list, title="Samples")


class Undocumented(BaseModel):
    title: str
    description: int
    examples: list[str] = Field(default_factory=list)


class Plain(BaseModel):
    label: str


class PlainDocumented(BaseModel):
    """Documented."""

    label: str = Field(title="Label", description="The label", examples=["a"])


def test_real_titles_descriptions_and_examples_are_still_cosmetic() -> None:
    assert with_output(Documented).hash == with_output(Undocumented).hash
    assert with_output(Plain).hash == with_output(PlainDocumented).hash
    assert with_output(None, input_schema=Documented).hash == with_output(
        None, input_schema=Undocumented).hash


def fan(order: list[str]) -> Workflow:
    return Workflow("fan", on_failure=FAIL, steps=[
        Parallel("both", branches=[Step(name, executor="tool") for name in order], next=END)])


def test_branch_order_is_behaviour_so_it_is_in_the_hash() -> None:
    ab, ba = fan(["a", "b"]), fan(["b", "a"])
    assert ab.hash != ba.hash
    assert ab.hash == fan(["a", "b"]).hash
    # Why it must differ: branches are scheduled in declared order, so a history recorded
    # under one order does not re-derive under the other (what `replay --verify` checks).
    sim = Simulator(ab)
    sim.start({})
    scheduled = [e.step for e in sim.history if e.type == "StepScheduled"]
    assert scheduled == ["both", "a", "b"]
    sim.run_to_end()
    check_history(ab, sim.history)
    with pytest.raises(InvariantViolated):
        check_history(ba, sim.history)
