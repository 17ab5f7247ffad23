"""A deterministic stand-in for a model: scripted outputs, latencies, failures and usage.

For tests and the offline demo. Everything it does is derived from the task (step, attempt,
idempotency key, input), never from global random state, so the same run behaves the same
way every time.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rulebound.domain.events import Usage
from rulebound.engine.executor import ExecutorError, Result, Task

_RETRYABLE = {"timeout", "connection", "rate_limited", "server_error", "invalid_output"}


def unit(*parts: object) -> float:
    """A stable number in [0, 1) from the parts."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


@dataclass(frozen=True)
class Script:
    """What one step does.

    output: a value, or a function of the task input (it may raise an ExecutorError).
    latency: seconds per call (a base; `jitter` spreads it by that fraction, seeded).
    failures: error kinds for attempts 1, 2, ... before the step succeeds.
    flaky: share of first attempts that fail with `flaky_kind` (chosen per idempotency key).
    retry_after: seconds a rate_limited failure asks for.
    usage: a Usage, or a function of the input.
    hang: never answer (to test timeouts).
    """

    output: Any = None
    latency: float = 0.0
    jitter: float = 0.0
    failures: Sequence[str] = ()
    flaky: float = 0.0
    flaky_kind: str = "server_error"
    retry_after: float | None = None
    usage: Usage | Callable[[Any], Usage] | None = None
    hang: bool = False


class ScriptedModel:
    """An executor that plays a script per step name (the part of the key before any `[`).

    It stands in for a model, so like one it spends tokens: its steps must declare
    `max_tokens` (pass `spends_tokens=False` to script a tool that uses none).
    """

    def __init__(self, scripts: Mapping[str, Script], default: Script | None = None, *,
                 spends_tokens: bool = True) -> None:
        self.spends_tokens = spends_tokens
        self.scripts = dict(scripts)
        self.default = default
        self.calls: list[tuple[str, int]] = []

    async def __call__(self, task: Task) -> Result:
        name = task.step.partition("[")[0]
        script = self.scripts.get(name, self.default)
        if script is None:
            raise ExecutorError(f"no script for step {name!r}", kind="client_error")
        self.calls.append((task.step, task.attempt))
        roll = unit(task.idempotency_key, task.attempt)
        if script.hang:
            await asyncio.Event().wait()
        delay = script.latency * (1 + script.jitter * (2 * roll - 1))
        if delay > 0:
            await asyncio.sleep(delay)
        kind = None
        if task.attempt <= len(script.failures):
            kind = script.failures[task.attempt - 1]
        elif task.attempt == 1 and unit(task.idempotency_key, "flaky") < script.flaky:
            kind = script.flaky_kind
        if kind is not None:
            raise ExecutorError(
                f"scripted {kind}", kind=kind, retryable=kind in _RETRYABLE,
                retry_after=script.retry_after if kind == "rate_limited" else None)
        output = script.output(task.input) if callable(script.output) else script.output
        usage = script.usage(task.input) if callable(script.usage) else script.usage
        return Result(output=output, usage=usage or Usage())
