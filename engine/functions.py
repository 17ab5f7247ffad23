"""Plain async Python functions as executors, and the check every registered executor passes.

An executor is anything awaitable with a `Task` (see executor.Executor). Most users write a
plain `async def` of the step's input instead, so `as_executor` adapts one: a function whose
one parameter is annotated `Task`, or is named `task` with no other annotation, receives the
Task as it is; any other async function receives the step's input (`fn(input)`) or the input
and the Task (`fn(input, task)`) through `FunctionExecutor`. It lives in the engine, not in
the adapters, because the engine's own registry adapts functions as they are registered.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from rulebound.domain.errors import DefinitionError

from .executor import ExecutorError, Result, Task

__all__ = ["FunctionExecutor", "as_executor", "check_executors"]

_MESSAGE_LIMIT = 500


class FunctionExecutor:
    """Wraps `async def fn(input)` or `async def fn(input, task)`.

    The function returns an output (or a Result with usage). An ExecutorError passes through
    with its classification; any other exception is a permanent failure whose message is the
    exception's type and text; cancellation is never swallowed.
    """

    def __init__(self, fn: Callable[..., Awaitable[Any]]) -> None:
        if not inspect.iscoroutinefunction(fn):
            raise TypeError(f"{getattr(fn, '__name__', fn)!r} must be an async function")
        self.fn = fn
        self._wants_task = len(_positional(fn)) >= 2

    async def __call__(self, task: Task) -> Result:
        try:
            if self._wants_task:
                value = await self.fn(task.input, task)
            else:
                value = await self.fn(task.input)
        except ExecutorError:
            raise
        except Exception as exc:
            raise ExecutorError(f"{type(exc).__name__}: {exc}"[:_MESSAGE_LIMIT], kind="error",
                                retryable=False) from exc
        return value if isinstance(value, Result) else Result(output=value)

    def __repr__(self) -> str:
        return f"FunctionExecutor({getattr(self.fn, '__qualname__', self.fn)!r})"


def _positional(fn: Callable[..., Any]) -> list[inspect.Parameter]:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # no signature to read (some builtins): call it as given
        return []
    return [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _takes_task(fn: Callable[..., Any]) -> bool:
    """Whether a one-parameter async function is an executor proper (it wants the Task)."""
    params = _positional(fn)
    if len(params) != 1:
        return False
    note = params[0].annotation
    if note is Task or note in ("Task", "rulebound.Task", "rulebound.engine.Task"):
        return True  # `from __future__ import annotations` leaves the annotation as text
    no_opinion = note in (inspect.Parameter.empty, Any, "Any", "typing.Any")
    return no_opinion and params[0].name == "task"


def as_executor(name: str, value: Any) -> Any:
    """`value` as an executor for the name `name`, or a DefinitionError naming the problem.

    An async function of the step's input is wrapped as a FunctionExecutor; an executor proper
    (an object with `async __call__(task)`, or an async function of the Task) is kept as it is.
    """
    if not isinstance(name, str) or not name:
        raise DefinitionError(f"executor names must be non-empty strings, got {name!r}")
    if inspect.iscoroutinefunction(value):
        if inspect.ismethod(value) or inspect.isfunction(value) or hasattr(value, "func"):
            return value if _takes_task(value) else FunctionExecutor(value)
        return value  # an instance whose __call__ is async: an executor proper
    if inspect.isfunction(value) or inspect.ismethod(value) or inspect.isbuiltin(value):
        label = getattr(value, "__name__", "function")
        raise DefinitionError(
            f"executor {name!r}: {label!r} is not an async function (declare it `async def`)")
    if isinstance(value, type):
        raise DefinitionError(
            f"executor {name!r} is the class {value.__name__}, not an instance of it")
    if not callable(value):
        raise DefinitionError(
            f"executor {name!r} is a {type(value).__name__}, not an executor (an async "
            "function, or an object with `async def __call__(self, task)`)")
    return value


def check_executors(executors: object) -> dict[str, Any]:
    """A name -> executor dict from what a user passed as `executors`, adapting functions."""
    if executors is None:
        return {}
    if not isinstance(executors, Mapping):
        hint = (" (did you write {a, b} for {'a': a, 'b': b}?)"
                if isinstance(executors, set | frozenset | list | tuple) else "")
        raise DefinitionError(
            "executors must be a mapping of name to executor, e.g. {'llm': classify}; "
            f"got a {type(executors).__name__}{hint}")
    return {name: as_executor(name, value) for name, value in executors.items()}
