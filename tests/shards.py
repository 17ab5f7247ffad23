"""Helpers for tests with several engines on one store: runs on a chosen engine's shards."""

from __future__ import annotations

from typing import Any

from rulebound import Engine


async def owned_run(engine_: Engine, workflow: str = "approval", *,
                    cancel_others: bool = True) -> Any:
    """Start runs through `engine_` until one lands on a shard it owns (the others are
    cancelled, unless they end on their own)."""
    for i in range(50):
        candidate = await engine_.start(workflow, {"i": i})
        if engine_.ownership.owns(candidate):  # type: ignore[union-attr]
            return candidate
        if cancel_others:
            await engine_.cancel(candidate)
    raise AssertionError(f"no run of 50 landed on a shard of {engine_.worker}")
