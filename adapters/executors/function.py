"""Run a plain async Python function as a step.

`FunctionExecutor` lives in the engine (rulebound.engine.functions), whose registry wraps a
plain async function in it when one is registered as an executor; it is re-exported here
beside the other executors that ship.
"""

from __future__ import annotations

from rulebound.engine.functions import FunctionExecutor

__all__ = ["FunctionExecutor"]
