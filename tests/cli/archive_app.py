"""An --app for the archive tests: runs that complete, runs that fail, runs that wait."""

from __future__ import annotations

from typing import Any

from rulebound import FAIL, PermanentError, Registry, Step, Task, WaitForSignal, Workflow


async def echo(task: Task) -> Any:
    return {"echo": task.input}


async def boom(task: Task) -> Any:
    raise PermanentError("bad input", kind="client_error")


registry = Registry(
    workflows=[
        Workflow("pay", on_failure=FAIL, steps=[Step("check", executor="echo", next="book"),
                                                Step("book", executor="echo")]),
        Workflow("broken", on_failure=FAIL, steps=[Step("try", executor="boom")]),
        Workflow("hold", on_failure=FAIL, steps=[
            WaitForSignal("wait", signal="go", timeout=86_400, next="done"),
            Step("done", executor="echo")]),
    ],
    executors={"echo": echo, "boom": boom})
