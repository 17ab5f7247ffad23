"""rulebound's pure core: definitions, events, run state and the decider.

Nothing here does I/O, reads a clock, draws random numbers or touches asyncio; the same
definition and the same events always give the same state and the same decisions.
"""

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
