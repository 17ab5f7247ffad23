"""rulebound: the system orchestrates, the model executes.

`from rulebound import ...` is the one documented import. The code lives in three layers,
installed as parts of this package (dependencies point inward):

    rulebound.domain    pure and synchronous: definitions, events, run state, the decider
    rulebound.engine    the asyncio runtime: Engine, Registry, executor protocol, testing aid
    rulebound.adapters  the outside world: stores, model and tool executors, HTTP, the CLI

Names are loaded on first use, so `import rulebound` (and the CLI's start-up) pays only for
what a program touches.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rulebound._lazy import lazy_names

# Where each public name lives, grouped by who reaches for it.
_HOMES: dict[str, str] = {
    # Writing workflows: the definition language.
    "Workflow": "rulebound.domain.definitions",
    "Step": "rulebound.domain.definitions",
    "Retry": "rulebound.domain.definitions",
    "Limits": "rulebound.domain.definitions",
    "Route": "rulebound.domain.definitions",
    "Parallel": "rulebound.domain.definitions",
    "Map": "rulebound.domain.definitions",
    "WaitForSignal": "rulebound.domain.definitions",
    "END": "rulebound.domain.definitions",
    "FAIL": "rulebound.domain.definitions",
    "field": "rulebound.domain.conditions",
    # Running them: the engine, the bundle the CLI and server load, limits, what you read back.
    "Engine": "rulebound.engine.engine",
    "Registry": "rulebound.engine.registry",
    "RateLimit": "rulebound.engine.ratelimit",
    "Retention": "rulebound.engine.retention",
    "RunView": "rulebound.engine.views",
    "StepView": "rulebound.engine.views",
    # Writing executors: what an executor is given and what it returns or raises.
    "Executor": "rulebound.engine.executor",
    "Task": "rulebound.engine.executor",
    "Result": "rulebound.engine.executor",
    "Usage": "rulebound.domain.events",
    "Spend": "rulebound.engine.executor",
    "ExecutorContext": "rulebound.engine.executor",
    "ExecutorError": "rulebound.engine.executor",
    "RetryableError": "rulebound.engine.executor",
    "PermanentError": "rulebound.engine.executor",
    # Executors that ship: models, HTTP tools, plain functions, a scripted model for tests.
    "OpenAIChat": "rulebound.adapters.executors.models",
    "AnthropicMessages": "rulebound.adapters.executors.models",
    "HttpTool": "rulebound.adapters.executors.http_tool",
    "FunctionExecutor": "rulebound.engine.functions",
    "ScriptedModel": "rulebound.adapters.executors.scripted",
    "Script": "rulebound.adapters.executors.scripted",
    # Errors (the tree is drawn in rulebound.domain.errors).
    "RuleboundError": "rulebound.domain.errors",
    "DefinitionError": "rulebound.domain.errors",
    "RunNotFound": "rulebound.domain.errors",
    "CorruptRun": "rulebound.domain.errors",
    "InvalidEvent": "rulebound.domain.errors",
    "WorkflowNotFound": "rulebound.engine.errors",
    "InvalidInput": "rulebound.engine.errors",
    "RunTerminal": "rulebound.engine.errors",
    "EngineClosed": "rulebound.engine.errors",
    "Overloaded": "rulebound.engine.errors",
    "Conflict": "rulebound.engine.errors",
    "IdempotencyConflict": "rulebound.engine.errors",
    "StoreError": "rulebound.engine.store",
    "StoreUnavailable": "rulebound.engine.store",
    "ConcurrencyConflict": "rulebound.engine.store",
    "AppLoadError": "rulebound.engine.registry",
    # Replaying and property-testing: the pure fold and decider, and the testing aid.
    "Event": "rulebound.domain.events",
    "RunState": "rulebound.domain.state",
    "evolve": "rulebound.domain.state",
    "replay": "rulebound.domain.state",
    "decide": "rulebound.domain.decider",
    "Simulator": "rulebound.domain.simulator",
    "check_workflow": "rulebound.engine.testing",
    "InvariantViolated": "rulebound.engine.testing",
    "FaultyStore": "rulebound.engine.faults",
}

__all__ = list(_HOMES)


__getattr__ = lazy_names(__name__, _HOMES)


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])


if TYPE_CHECKING:  # the same names for type checkers and IDEs (`X as X`: re-exported)
    from rulebound.adapters.executors.http_tool import HttpTool as HttpTool
    from rulebound.adapters.executors.models import (
        AnthropicMessages as AnthropicMessages,
        OpenAIChat as OpenAIChat,
    )
    from rulebound.adapters.executors.scripted import (
        Script as Script,
        ScriptedModel as ScriptedModel,
    )
    from rulebound.domain.conditions import field as field
    from rulebound.domain.decider import decide as decide
    from rulebound.domain.definitions import (
        END as END,
        FAIL as FAIL,
        Limits as Limits,
        Map as Map,
        Parallel as Parallel,
        Retry as Retry,
        Route as Route,
        Step as Step,
        WaitForSignal as WaitForSignal,
        Workflow as Workflow,
    )
    from rulebound.domain.errors import (
        CorruptRun as CorruptRun,
        DefinitionError as DefinitionError,
        InvalidEvent as InvalidEvent,
        RuleboundError as RuleboundError,
        RunNotFound as RunNotFound,
    )
    from rulebound.domain.events import Event as Event, Usage as Usage
    from rulebound.domain.simulator import Simulator as Simulator
    from rulebound.domain.state import RunState as RunState, evolve as evolve, replay as replay
    from rulebound.engine.engine import Engine as Engine
    from rulebound.engine.errors import (
        Conflict as Conflict,
        EngineClosed as EngineClosed,
        IdempotencyConflict as IdempotencyConflict,
        InvalidInput as InvalidInput,
        Overloaded as Overloaded,
        RunTerminal as RunTerminal,
        WorkflowNotFound as WorkflowNotFound,
    )
    from rulebound.engine.executor import (
        Executor as Executor,
        ExecutorContext as ExecutorContext,
        ExecutorError as ExecutorError,
        PermanentError as PermanentError,
        Result as Result,
        RetryableError as RetryableError,
        Spend as Spend,
        Task as Task,
    )
    from rulebound.engine.faults import FaultyStore as FaultyStore
    from rulebound.engine.functions import FunctionExecutor as FunctionExecutor
    from rulebound.engine.ratelimit import RateLimit as RateLimit
    from rulebound.engine.registry import AppLoadError as AppLoadError, Registry as Registry
    from rulebound.engine.retention import Retention as Retention
    from rulebound.engine.store import (
        ConcurrencyConflict as ConcurrencyConflict,
        StoreError as StoreError,
        StoreUnavailable as StoreUnavailable,
    )
    from rulebound.engine.testing import (
        InvariantViolated as InvariantViolated,
        check_workflow as check_workflow,
    )
    from rulebound.engine.views import RunView as RunView, StepView as StepView
