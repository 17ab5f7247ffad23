"""The typed errors users catch. One base class so `except RuleboundError` catches ours only."""

from __future__ import annotations


class RuleboundError(Exception):
    """Base class of every error rulebound raises on purpose."""


class DefinitionError(RuleboundError, ValueError):
    """A workflow definition is invalid; the message names the element at fault."""


class RunNotFound(RuleboundError, LookupError):
    """No run has the given id."""


class CorruptRun(RuleboundError):
    """A run's stored events cannot be decoded or folded; the run is quarantined."""

    def __init__(self, run_id: object, message: str, *, seq: int | None = None) -> None:
        self.run_id = run_id
        self.seq = seq
        where = f" at event {seq}" if seq is not None else ""
        super().__init__(f"run {run_id} is corrupt{where}: {message}")


class InvalidEvent(RuleboundError, ValueError):
    """An event does not apply to the run's state (e.g. a result for an attempt never started)."""
