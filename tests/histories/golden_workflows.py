"""Realistic workflows and scripted histories behind the golden logs in this folder.

`python tests/histories/regenerate.py` rewrites the .jsonl and .state.json files from these
scripts. Do that only for a deliberate change of the event model; the test never does.
"""

from __future__ import annotations

from collections.abc import Callable
from uuid import UUID, uuid5

from pydantic import BaseModel
from rulebound.domain import (
    END,
    FAIL,
    Limits,
    Map,
    Parallel,
    Retry,
    Route,
    Simulator,
    Step,
    WaitForSignal,
    Workflow,
    field,
)
from rulebound.domain import events as ev
from rulebound.engine import codec

NAMESPACE = UUID("1b9d4c5e-0e7a-4f43-9a4e-0d3c2b1a0f00")


class Label(BaseModel):
    category: str
    confidence: float


class Draft(BaseModel):
    text: str
    refund: float


chain = Workflow("chain", on_failure=FAIL, limits=Limits(max_cost=1.0), steps=[
    Step("fetch", executor="http", next="summarise", cost=0.0),
    Step("summarise", executor="llm", cost=0.01, max_tokens=500, next="store"),
    Step("store", executor="db")])

router = Workflow("router", on_failure="escalate", steps=[
    Step("classify", executor="llm", output=Label, cost=0.002, max_tokens=200,
         routes=[Route("billing", when=field("classify.category") == "billing"),
                 Route("escalate", when=field("classify.confidence") < 0.5)],
         next="general"),
    Step("billing", executor="llm"), Step("general", executor="llm"),
    Step("escalate", executor="human", on_failure=FAIL)])

retry_storm = Workflow("retry-storm", on_failure="giveup", limits=Limits(max_cost=0.05),
                       steps=[
    Step("call", executor="api", cost=0.01,
         retry=Retry(attempts=5, backoff=1.0, multiplier=2.0, jitter=0.2,
                     on=("rate_limited", "server_error", "timeout", "abandoned")),
         next=END),
    Step("giveup", executor="human", on_failure=FAIL)])

fan_out = Workflow("fan-out", on_failure=FAIL, steps=[
    Step("list", executor="tool", next="enrich"),
    Parallel("enrich", branches=[Step("crm", executor="tool"), Step("orders", executor="tool")],
             on_branch_failure="collect", next="each"),
    Map("each", over="list.items", step=Step("summary", executor="llm", input={"doc": "item"}),
        max_concurrency=2, next="join"),
    Step("join", executor="tool", input={"parts": "each", "context": "enrich"})])

approval = Workflow("approval", on_failure=FAIL, steps=[
    Step("draft", executor="llm", output=Draft, next="check"),
    Step("check", executor="policy",
         routes=[Route("approve", when=field("draft.refund") > 100)], next="send"),
    WaitForSignal("approve", signal="approval", timeout=3600, on_timeout="expire",
                  routes=[Route("send", when=field("approve.ok").is_true())], next="reject"),
    Step("send", executor="mail"), Step("reject", executor="mail"),
    Step("expire", executor="mail")])


def _linear() -> Simulator:
    sim = Simulator(chain, seed=11)
    sim.start({"url": "https://example.invalid/doc"})
    sim.start_attempt("fetch")
    sim.succeed("fetch", {"body": "hello"})
    sim.start_attempt("summarise")
    sim.succeed("summarise", {"summary": "hi"}, ev.Usage(tokens_in=40, tokens_out=12,
                                                         cost=0.0003))
    sim.start_attempt("store")
    sim.succeed("store", {"stored": True})
    return sim


def _router() -> Simulator:
    sim = Simulator(router, seed=12)
    sim.start({"text": "I was charged twice"})
    sim.start_attempt("classify")
    sim.succeed("classify", {"category": "billing", "confidence": 0.93},
                ev.Usage(tokens_in=30, tokens_out=8, cost=0.0002))
    sim.start_attempt("billing")
    sim.succeed("billing", {"reply": "refund issued"})
    return sim


def _retry_storm() -> Simulator:
    sim = Simulator(retry_storm, seed=13)
    sim.start({})
    for kind, after in (("rate_limited", 4.0), ("server_error", None), ("timeout", None)):
        sim.advance_time(30)
        sim.start_attempt("call")
        sim.fail("call", kind, retry_after=after, usage=ev.Usage(cost=0.004))
    sim.advance_time(30)
    sim.start_attempt("call")
    sim.crash()
    sim.advance_time(30)
    sim.start_attempt("call")
    sim.succeed("call", {"status": 200}, ev.Usage(cost=0.002))
    return sim


def _fan_out() -> Simulator:
    sim = Simulator(fan_out, seed=14)
    sim.start({})
    sim.run_to_end({"list": {"items": ["a", "b", "c"]}, "crm": {"tier": "gold"},
                    "orders": {"n": 3}, "summary": {"s": "..."}, "join": {"ok": True}})
    return sim


def _approval() -> Simulator:
    sim = Simulator(approval, seed=15)
    sim.start({"ticket": "T-1"})
    sim.start_attempt("draft")
    sim.succeed("draft", {"text": "We will refund you", "refund": 250.0})
    sim.start_attempt("check")
    sim.succeed("check", {"ok": True})
    sim.advance_time(600)
    sim.signal("approval", {"ok": True, "by": "supervisor"})
    sim.start_attempt("send")
    sim.succeed("send", {"sent": True})
    return sim


SCRIPTS: dict[str, tuple[Workflow, Callable[[], Simulator]]] = {
    "linear_chain": (chain, _linear),
    "router": (router, _router),
    "retry_storm": (retry_storm, _retry_storm),
    "fan_out": (fan_out, _fan_out),
    "human_approval": (approval, _approval),
}


def stored_lines(name: str, history: list[ev.Event]) -> list[bytes]:
    """The history in the stored format, with deterministic ids and the hash chain."""
    prev, lines = codec.GENESIS_HASH, []
    for seq, event in enumerate(history, start=1):
        prev, data = codec.stamp(event, uuid5(NAMESPACE, f"{name}:{seq}"), prev)
        lines.append(data)
    return lines
