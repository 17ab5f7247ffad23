"""rulebound's asyncio runtime: the Engine facade, the Registry, and the ports it plugs into.

Names are imported on first use: a command or a program that needs the store port or the
codec does not import the engine, its executors' protocol and the domain with it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rulebound._lazy import lazy_names

_HOMES = {
    **dict.fromkeys(("Clock", "SystemClock"), ".clock"),
    "Engine": ".engine",
    **dict.fromkeys(("EngineClosed", "InvalidInput", "Overloaded", "RunTerminal",
                     "WorkflowNotFound"), ".errors"),
    **dict.fromkeys(("Executor", "ExecutorContext", "ExecutorError", "PermanentError",
                     "Result", "RetryableError", "Spend", "Task", "Usage"), ".executor"),
    "RateLimit": ".ratelimit",
    **dict.fromkeys(("AppLoadError", "Registry", "load_app"), ".registry"),
    **dict.fromkeys(("ConcurrencyConflict", "EventStore", "StoreError", "StoreUnavailable",
                     "WriteOutcomeUnknown"), ".store"),
    **dict.fromkeys(("RunView", "StepView"), ".views"),
}

__all__ = [
    "AppLoadError",
    "Clock",
    "ConcurrencyConflict",
    "Engine",
    "EngineClosed",
    "EventStore",
    "Executor",
    "ExecutorContext",
    "ExecutorError",
    "InvalidInput",
    "Overloaded",
    "PermanentError",
    "RateLimit",
    "Registry",
    "Result",
    "RetryableError",
    "RunTerminal",
    "RunView",
    "Spend",
    "StepView",
    "StoreError",
    "StoreUnavailable",
    "SystemClock",
    "Task",
    "Usage",
    "WorkflowNotFound",
    "WriteOutcomeUnknown",
    "load_app",
]


__getattr__ = lazy_names(__name__, _HOMES)


if TYPE_CHECKING:
    from .clock import Clock, SystemClock
    from .engine import Engine
    from .errors import EngineClosed, InvalidInput, Overloaded, RunTerminal, WorkflowNotFound
    from .executor import (
        Executor,
        ExecutorContext,
        ExecutorError,
        PermanentError,
        Result,
        RetryableError,
        Spend,
        Task,
        Usage,
    )
    from .ratelimit import RateLimit
    from .registry import AppLoadError, Registry, load_app
    from .store import (
        ConcurrencyConflict,
        EventStore,
        StoreError,
        StoreUnavailable,
        WriteOutcomeUnknown,
    )
    from .views import RunView, StepView
