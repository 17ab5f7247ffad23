"""`rulebound demo`: run the triage workflow over the sample tickets and show what happened."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, TextIO
from uuid import UUID

from rulebound.domain.explain import counted
from rulebound.engine import Engine, RateLimit, Registry

from .model import Outbox, crm, orders, policy, triage_model
from .workflow import triage

TICKETS = Path(__file__).with_name("tickets.jsonl")


def demo_registry(outbox: Outbox | None = None, model: Any = None) -> Registry:
    """The demo's workflow and executors: the offline model unless one is configured."""
    outbox = outbox or Outbox()
    return Registry(
        workflows=[triage],
        executors={"llm": model or _model_from_env() or triage_model(), "crm": crm,
                   "orders": orders, "policy": policy, "mailer": outbox.send,
                   "human_queue": outbox.escalate},
        rate_limits={"llm": RateLimit(requests=600, tokens=400_000, per=60)},
    )


def _model_from_env() -> Any:
    if not os.environ.get("RULEBOUND_OPENAI_BASE_URL"):
        return None
    from rulebound.adapters.executors import OpenAIChat

    return OpenAIChat.from_env()


def load_tickets(path: Path = TICKETS) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


class Progress:
    """A one-line progress bar on a terminal; a few plain lines otherwise."""

    def __init__(self, total: int, out: TextIO, label: str = "runs") -> None:
        self.total, self.out, self.label = total, out, label
        self.tty = out.isatty()
        self._last = -1

    def update(self, done: int, note: str = "") -> None:
        if self.tty:
            width = 30
            filled = int(width * done / max(1, self.total))
            self.out.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} "
                           f"{self.label} {note:<30}")
            self.out.flush()
        else:
            step = max(1, self.total // 4)
            if done // step != self._last or done == self.total:
                self._last = done // step
                self.out.write(f"{done}/{self.total} {self.label} finished {note}\n")
                self.out.flush()

    def close(self) -> None:
        if self.tty:
            self.out.write("\n")


async def approver(engine: Engine, run_ids: list[UUID], stop: asyncio.Event) -> Counter[str]:
    """Plays the human: approves refunds up to $500 and rejects bigger ones."""
    decided: Counter[str] = Counter()
    done: set[UUID] = set()
    while not stop.is_set():
        for run_id in run_ids:
            if run_id in done:
                continue
            view = await engine.get(run_id)
            if view.terminal:
                done.add(run_id)
            elif "approval" in view.waiting_for:
                refund = float((view.steps["draft"].output or {}).get("refund", 0))
                ok = refund <= 500
                await engine.signal(run_id, "approval", {
                    "approved": ok, "by": "demo-supervisor",
                    "note": "within limits" if ok else "refund too large for auto-approval"})
                decided["approved" if ok else "rejected"] += 1
                done.add(run_id)
        await asyncio.sleep(0.05)
    return decided


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


async def run_demo(store: str, *, tickets: Path = TICKETS, out: TextIO = sys.stdout,
                   explain: bool = True) -> int:
    items = load_tickets(tickets)
    batch = time.strftime("%Y%m%dT%H%M%S")
    out.write(f"rulebound demo: triaging {len(items)} support tickets on {store}\n")
    model = "offline scripted model" if not os.environ.get("RULEBOUND_OPENAI_BASE_URL") else (
        f"model {os.environ.get('RULEBOUND_OPENAI_MODEL', '?')} at "
        f"{os.environ['RULEBOUND_OPENAI_BASE_URL']}")
    out.write(f"executors: {model}; approvals by a simulated supervisor\n\n")
    started = time.perf_counter()
    async with Engine(store, registry=demo_registry(), max_concurrency=32) as engine:
        run_ids = [await engine.start(triage.name, t, idempotency_key=f"demo-{batch}-{t['id']}")
                   for t in items]
        stop = asyncio.Event()
        human = asyncio.create_task(approver(engine, run_ids, stop))
        progress = Progress(len(run_ids), out)
        views = {}
        pending = {asyncio.create_task(engine.wait(r)): r for r in run_ids}
        progress.update(0)
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                views[pending.pop(task)] = task.result()
            progress.update(len(views))
        progress.close()
        stop.set()
        decisions = await human
        elapsed = time.perf_counter() - started
        ordered = [views[r] for r in run_ids]
        _summary(out, ordered, decisions, elapsed)
        if explain:
            pick = _interesting(ordered, items)
            out.write(f"\nWhy did ticket {pick[1]} go the way it did? "
                      f"(`rulebound explain {pick[0].run_id}`)\n\n")
            out.write(await engine.explain(pick[0].run_id))
    out.write(f"\nInspect the runs: rulebound runs; rulebound show RUN; rulebound explain RUN"
              f"  (store: {store})\n")
    return 0


def _final_step(view: Any) -> str:
    for name in ("send", "close", "escalate"):
        if name in view.steps and view.steps[name].status == "completed":
            return {"send": "replied", "close": "closed as spam", "escalate": "escalated"}[name]
    return view.status


def _summary(out: TextIO, views: list[Any], decisions: Counter[str], elapsed: float) -> None:
    statuses = Counter(v.status for v in views)
    outcomes = Counter(_final_step(v) for v in views)
    durations = [(v.updated_at - v.started_at).total_seconds() for v in views
                 if v.updated_at and v.started_at]
    retries = sum(v.retries for v in views)
    attempts = sum(v.attempts for v in views)
    steps = sum(v.steps_taken for v in views)
    cost = sum(v.usage.cost for v in views)
    tokens = sum(v.usage.tokens for v in views)
    rows = [
        ("runs", f"{len(views)} in {elapsed:.2f}s"),
        ("by status", ", ".join(f"{k} {n}" for k, n in sorted(statuses.items()))),
        ("by outcome", ", ".join(f"{k} {n}" for k, n in sorted(outcomes.items()))),
        ("steps", f"{steps} ({counted(attempts, 'attempt')}, {counted(retries, 'retry')})"),
        ("approvals", ", ".join(f"{k} {n}" for k, n in sorted(decisions.items())) or "none"),
        ("cost", f"${cost:.4f} ({tokens} tokens)"),
        ("run latency", f"p50 {_percentile(durations, 50) * 1000:.0f} ms, "
                        f"p90 {_percentile(durations, 90) * 1000:.0f} ms, "
                        f"p99 {_percentile(durations, 99) * 1000:.0f} ms"),
    ]
    width = max(len(k) for k, _ in rows)
    out.write("\nSummary\n")
    for key, value in rows:
        out.write(f"  {key:<{width}}  {value}\n")
    notable = []
    for v in views:
        if v.reason and "limit" in (v.reason or ""):
            notable.append((v, "budget limit"))
        elif "escalate" in v.steps and v.steps["escalate"].status == "completed":
            why = (v.steps["escalate"].output or {}).get("why")
            notable.append((v, f"escalated ({why})"))
    if notable:
        out.write("\n  escalations:\n")
        for v, why in notable[:12]:
            out.write(f"    {v.run_id}  {why}\n")


def _interesting(views: list[Any], items: list[dict[str, Any]]) -> tuple[Any, str]:
    """The run whose explanation shows the most: an approval after a retry, if any."""
    def score(pair: tuple[Any, dict[str, Any]]) -> tuple[int, int]:
        view, _ = pair
        return ("approval" in view.steps, view.retries)

    view, item = max(zip(views, items, strict=True), key=score)
    return view, item["id"]
