"""What `executors=` accepts: plain async functions directly, and a clear error for the rest."""

from __future__ import annotations

from typing import Any

import pytest
from rulebound.domain import FAIL
from rulebound.domain.errors import DefinitionError

from rulebound import Engine, Registry, Step, Task, Workflow


def two_steps() -> Workflow:
    return Workflow("pair", on_failure=FAIL, steps=[
        Step("shout", executor="shout", next="count"),
        Step("count", executor="count", input="shout")])


async def shout(text: str) -> str:
    return text.upper()


async def test_a_plain_async_function_gets_the_steps_input() -> None:
    async def count(words: str, task: Task) -> dict[str, Any]:
        return {"words": len(words.split()), "step": task.step}

    async with Engine("memory://", [two_steps()], {"shout": shout, "count": count}) as engine:
        view = await engine.wait(await engine.start("pair", "hello new world"), timeout=10)
    assert view.status == "completed", view.to_dict()
    assert view.output == {"words": 3, "step": "count"}


async def test_a_function_of_the_task_is_still_an_executor_proper() -> None:
    async def by_annotation(t: Task) -> str:
        return f"{t.step}:{t.input}"

    async def task(task):  # type: ignore[no-untyped-def]  # unannotated, named `task`
        return task.input + "!"

    wf = Workflow("pair", on_failure=FAIL, steps=[
        Step("shout", executor="shout", next="count"),
        Step("count", executor="count", input="shout")])
    async with Engine("memory://", [wf], {"shout": by_annotation, "count": task}) as engine:
        view = await engine.wait(await engine.start("pair", "x"), timeout=10)
    assert view.output == "shout:x!"


@pytest.mark.parametrize(("executors", "message"), [
    ({shout}, "executors must be a mapping of name to executor.*got a set.*did you write"),
    ([shout], "executors must be a mapping.*got a list"),
    ({"shout": "shout"}, "executor 'shout' is a str, not an executor"),
    ({"shout": lambda text: text}, "executor 'shout': '<lambda>' is not an async function"),
    ({"shout": Registry}, "executor 'shout' is the class Registry, not an instance"),
    ({1: shout}, "executor names must be non-empty strings, got 1"),
])
def test_a_wrong_executors_value_is_refused_at_construction(executors: Any,
                                                            message: str) -> None:
    with pytest.raises(DefinitionError, match=message):
        Engine("memory://", [two_steps()], executors)
    with pytest.raises(DefinitionError, match=message):
        Registry([two_steps()], executors)


def test_executors_added_to_a_registry_later_are_checked_and_adapted_too() -> None:
    registry = Registry([two_steps()])
    registry.executors["shout"] = shout
    with pytest.raises(DefinitionError, match="executor 'count' is a int"):
        registry.executors["count"] = 3
    with pytest.raises(DefinitionError, match="got a set"):
        registry.executors.update({shout})
    assert registry.missing_executors() == [("pair", "count")]
