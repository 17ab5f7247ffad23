"""Errors the engine raises to its callers (the HTTP server maps them to status codes)."""

from __future__ import annotations

from rulebound.domain.errors import RuleboundError


class WorkflowNotFound(RuleboundError, LookupError):
    """No registered workflow has that name (or that version)."""


class InvalidInput(RuleboundError, ValueError):
    """A run's input or a signal's payload does not match its schema."""


class RunTerminal(RuleboundError):
    """The run has ended; it takes no more signals or cancellations."""


class EngineClosed(RuleboundError):
    """The engine is not running (not entered, or already closed)."""


class Overloaded(RuleboundError):
    """The engine is saturated; try again after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Conflict(RuleboundError):
    """The request conflicts with what is stored (HTTP 409)."""


class IdempotencyConflict(Conflict):
    """An idempotency key or signal id already stands for a different request.

    The same key with the same request returns the first request's outcome; with a different
    one (another input, another signal name) it is refused, so a retry can never turn into a
    different action by accident.
    """
