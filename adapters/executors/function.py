"""Run a plain async Python function as a step."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any

from rulebound.engine.executor import ExecutorError, Result, Task

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
        params = [p for p in inspect.signature(fn).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        self._wants_task = len(params) >= 2

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
