"""rulebound's asyncio runtime: the Engine facade, the Registry, and the ports it plugs into."""

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
