"""Executors: plain functions, a scripted model for tests and the demo (more to come)."""

from .function import FunctionExecutor
from .scripted import Script, ScriptedModel

__all__ = ["FunctionExecutor", "Script", "ScriptedModel"]
