"""The offline demo's model is honest: it never reports more than the decider granted, and
the demo still shows retries, a failure path, a budget limit and approvals."""

from __future__ import annotations

import asyncio
from typing import Any

from rulebound.adapters.demo.run import approver, demo_registry, load_tickets
from rulebound.adapters.demo.workflow import triage
from rulebound.domain import events as ev
from rulebound.engine import Engine


async def test_the_demo_model_stays_inside_every_grant() -> None:
    async with Engine("memory://", registry=demo_registry(), max_concurrency=32) as engine:
        run_ids = [await engine.start(triage.name, t, idempotency_key=f"grants-{t['id']}")
                   for t in load_tickets()]
        stop = asyncio.Event()
        human = asyncio.create_task(approver(engine, run_ids, stop))
        views = [await engine.wait(r, timeout=60) for r in run_ids]
        stop.set()
        decisions = await human
        histories = [await engine.events(r) for r in run_ids]
    checked = 0
    limits: list[Any] = []
    for history in histories:
        grants: dict[str, ev.StepScheduled] = {}
        for event in history:
            if isinstance(event, ev.StepScheduled):
                grants[event.step] = event
            elif isinstance(event, ev.AttemptSucceeded | ev.AttemptFailed):
                grant = grants[event.step]
                if grant.max_tokens is not None:
                    assert event.usage.tokens <= grant.max_tokens, (event.step, event.usage)
                    checked += 1
                if grant.max_cost:
                    assert event.usage.cost <= grant.max_cost + 1e-12, (event.step, event.usage)
            elif isinstance(event, ev.LimitReached):
                limits.append(event.limit)
    assert checked > 100  # every model attempt of every run
    # ... and the demo still tells its whole story
    assert all(v.status == "completed" for v in views)
    assert sum(v.retries for v in views) > 0
    assert "cost" in limits
    escalated = [(v.steps["escalate"].output or {}).get("why") for v in views
                 if "escalate" in v.steps and v.steps["escalate"].status == "completed"]
    assert "invalid_output" in escalated and "cost limit" in escalated
    assert decisions["approved"] > 0 and decisions["rejected"] > 0
