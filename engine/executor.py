"""The executor protocol: one bounded task in, output and usage (or a typed error) out.

Executors never decide anything. They do not retry on their own and they do not sleep on a
Retry-After: they raise an `ExecutorError` saying whether the failure is retryable and, if
the far side asked for it, when to try again. The decider turns that into a recorded
not-before time, so every retry is visible in the log.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Hashable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol, runtime_checkable
from uuid import UUID

from pydantic import BaseModel
from rulebound.domain.errors import RuleboundError
from rulebound.domain.events import Usage

__all__ = [
    "Executor",
    "ExecutorContext",
    "ExecutorError",
    "PermanentError",
    "Result",
    "RetryableError",
    "Spend",
    "Task",
    "Usage",
]


class Spend:
    """What an attempt has spent so far, kept by the executor round by round.

    A multi-round executor (a model re-asked to repair its output) adds each round's usage
    here as soon as it is known, so that if the engine cancels the attempt at its deadline,
    the AttemptFailed it records still carries what was really consumed: the budget is a fold
    over facts, and a spend the log forgets would let a run overrun it.
    """

    __slots__ = ("cost", "tokens_in", "tokens_out")

    def __init__(self) -> None:
        self.tokens_in = 0
        self.tokens_out = 0
        self.cost = 0.0

    def add(self, usage: Usage) -> None:
        self.tokens_in += usage.tokens_in
        self.tokens_out += usage.tokens_out
        self.cost += usage.cost

    @property
    def usage(self) -> Usage:
        return Usage(tokens_in=self.tokens_in, tokens_out=self.tokens_out,
                     cost=round(self.cost, 12))


@dataclass(frozen=True, slots=True)
class Task:
    """A bounded unit of work handed to an executor.

    `idempotency_key` is `run_id:step:visit`: the same across retries of one visit, so an
    executor with outside side effects can deduplicate them. `max_tokens` and `max_cost` are
    the most this attempt may spend (granted by the decider from what is left of the budget).
    """

    run_id: UUID
    step: str
    attempt: int
    idempotency_key: str
    input: Any
    config: Mapping[str, Any]
    output_schema: type[BaseModel] | None
    timeout: float
    deadline: datetime
    max_tokens: int | None = None
    max_cost: float | None = None
    spent: Spend = field(default_factory=Spend)  # see Spend: report each round's usage here


@dataclass(frozen=True, slots=True)
class Result:
    """A successful attempt: JSON-compatible output (validated by the engine) and its usage."""

    output: Any
    usage: Usage = field(default_factory=Usage)


class ExecutorError(RuleboundError):
    """A failed attempt, classified for the decider.

    kind: a short machine-readable class ("timeout", "connection", "rate_limited",
    "server_error", "client_error", "auth", "not_found", "invalid_output", "truncated",
    "too_large", "refused", "error"); retry policies select on it.
    retry_after: seconds the far side asked us to wait (Retry-After, retry-after-ms).
    usage: what the failed attempt still consumed (a re-ask that failed validation costs).
    Messages must never contain secrets: executors build them from status and reason only.
    """

    retryable: bool = False
    default_kind = "error"

    def __init__(
        self,
        message: str,
        *,
        kind: str | None = None,
        retryable: bool | None = None,
        retry_after: float | None = None,
        usage: Usage | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.kind = kind or self.default_kind
        if retryable is not None:
            self.retryable = retryable
        self.retry_after = retry_after
        self.usage = usage or Usage()


class RetryableError(ExecutorError):
    retryable = True


class PermanentError(ExecutorError):
    retryable = False


@dataclass
class ExecutorContext:
    """Resources an engine shares with its executors (one HTTP client session per engine)."""

    resources: dict[Hashable, Any] = field(default_factory=dict)
    _closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    def http_session(self, key: Hashable = "http",
                     factory: Callable[[], Any] | None = None) -> Any:
        """The engine's aiohttp ClientSession for `key`, created on first use, closed with
        the engine. Executors that need a differently configured connector (the SSRF-guarded
        one of HTTP tools) pass their own key and factory; equal keys share one session."""
        session = self.resources.get(key)
        if session is None or session.closed:
            if factory is None:
                import aiohttp  # the engine owns the session's lifetime; adapters use it

                session = aiohttp.ClientSession(
                    timeout=aiohttp.ClientTimeout(total=None), trust_env=False)
            else:
                session = factory()
            self.resources[key] = session
            self._closers.append(session.close)
        return session

    async def aclose(self) -> None:
        while self._closers:
            await self._closers.pop()()


@runtime_checkable
class Executor(Protocol):
    """Anything awaitable with a Task. Optional hooks: `open(ctx)` and `close()`.

    Optional attribute `spends_tokens = True` (the model executors have it): every step on
    the executor must then declare `max_tokens`, or `Engine.open` (for the newest version of
    each workflow) and `Engine.register` refuse the definition, because the run's token limit
    is kept by reserving each attempt's ceiling in advance.
    """

    async def __call__(self, task: Task) -> Result: ...
