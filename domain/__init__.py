"""rulebound's pure core: definitions, events, run state and the decider.

Nothing here does I/O, reads a clock, draws random numbers or touches asyncio; the same
definition and the same events always give the same state and the same decisions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

# Where each name lives: imported on first use, so that importing one module of the domain
# (its errors, say) does not import the definition language and the decider.
_HOMES = {
    "field": ".conditions",
    **dict.fromkeys(("advance", "build_input", "decide", "dispatchable", "timers"),
                    ".decider"),
    **dict.fromkeys(("END", "FAIL", "Limits", "Map", "Parallel", "Retry", "Route", "Step",
                     "WaitForSignal", "Workflow"), ".definitions"),
    **dict.fromkeys(("CorruptRun", "DefinitionError", "InvalidEvent", "RuleboundError",
                     "RunNotFound"), ".errors"),
    **dict.fromkeys(("Event", "Usage"), ".events"),
    "Simulator": ".simulator",
    **dict.fromkeys(("RunState", "StepState", "evolve", "replay"), ".state"),
}

__all__ = [
    "END",
    "FAIL",
    "CorruptRun",
    "DefinitionError",
    "Event",
    "InvalidEvent",
    "Limits",
    "Map",
    "Parallel",
    "Retry",
    "Route",
    "RuleboundError",
    "RunNotFound",
    "RunState",
    "Simulator",
    "Step",
    "StepState",
    "Usage",
    "WaitForSignal",
    "Workflow",
    "advance",
    "build_input",
    "decide",
    "dispatchable",
    "evolve",
    "field",
    "replay",
    "timers",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    # the first name asked for loads the whole domain (relative imports only: the domain's
    # import rules are checked by tests/domain/test_events_and_purity)
    from . import conditions, decider, definitions, errors, events, simulator, state

    modules = {".conditions": conditions, ".decider": decider, ".definitions": definitions,
               ".errors": errors, ".events": events, ".simulator": simulator,
               ".state": state}
    value = getattr(modules[home], name)
    globals()[name] = value
    return value


if TYPE_CHECKING:
    from .conditions import field
    from .decider import advance, build_input, decide, dispatchable, timers
    from .definitions import (
        END,
        FAIL,
        Limits,
        Map,
        Parallel,
        Retry,
        Route,
        Step,
        WaitForSignal,
        Workflow,
    )
    from .errors import CorruptRun, DefinitionError, InvalidEvent, RuleboundError, RunNotFound
    from .events import Event, Usage
    from .simulator import Simulator
    from .state import RunState, StepState, evolve, replay
