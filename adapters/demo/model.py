"""The offline stand-in for a language model in the demo, and the demo's plain tools.

The model is a ScriptedModel: every output, latency, failure and token count is derived from
the task (its input and idempotency key), so two demo runs over the same tickets tell the
same story. It behaves like a model served over a network: it takes time, reports usage, is
sometimes rate limited or unavailable, and sometimes returns output that does not fit the
schema.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import replace
from typing import Any

from rulebound.adapters.executors.scripted import Script, ScriptedModel, unit
from rulebound.domain.events import Usage
from rulebound.engine.executor import ExecutorError, PermanentError, Task

PRICE_IN, PRICE_OUT = 3.0 / 1e6, 15.0 / 1e6  # USD per token


def _usage(text: str, out_tokens: int) -> Usage:
    tokens_in = 40 + len(text) // 4
    return Usage(tokens_in=tokens_in, tokens_out=out_tokens,
                 cost=round(tokens_in * PRICE_IN + out_tokens * PRICE_OUT, 8))


# What a "[storm]" draft attempt spends: the draft step's whole grant (1200 tokens, $0.012),
# a long prompt and a rambling answer cut off at the cap. Never more than the grant: a real
# executor caps the completion at what is left of it (tests/executors/test_demo_grants.py).
STORM = Usage(tokens_in=700, tokens_out=500, cost=round(700 * PRICE_IN + 500 * PRICE_OUT, 8))


def triage_model(latency: float = 0.02, flaky: float = 0.2) -> ScriptedModel:
    """The demo's three model steps (classify, extract, draft), scripted like a small LLM:
    about `flaky` of first attempts hit a rate limit or a 503, answers take time and cost
    tokens in proportion to the text, and some tickets make the model misbehave."""
    common = Script(latency=latency, jitter=0.5, flaky=flaky)
    return ScriptedModel({
        "classify": replace(common, output=_classify, usage=_usage_for(30),
                            flaky_kind="rate_limited", retry_after=0.05),
        "extract": replace(common, output=_extract, usage=_usage_for(60)),
        "draft": replace(common, output=_draft, usage=_usage_for(180)),
    })


def _usage_for(out_tokens: int) -> Any:
    return lambda data: _usage(str(data), out_tokens)


def _classify(data: dict[str, Any]) -> dict[str, Any]:
    text = f"{data.get('subject', '')} {data.get('body', '')}".lower()
    if "winner" in text or "crypto" in text:
        category = "spam"
    elif any(w in text for w in ("refund", "charge", "invoice", "billing")):
        category = "billing"
    elif any(w in text for w in ("password", "login", "account", "email")):
        category = "account"
    else:
        category = "technical"
    urgency = "high" if any(w in text for w in ("urgent", "asap", "down", "twice")) else "low"
    return {"category": category, "urgency": urgency,
            "confidence": round(0.6 + 0.4 * unit(text), 2)}


def _extract(data: dict[str, Any]) -> dict[str, Any]:
    body = str(data.get("body", ""))
    if "####" in body:  # unreadable: the model answers, but not in the schema
        return {"summary": None, "amount": "lots"}
    order = re.search(r"\b(ORD-\d+)\b", body)
    amount = re.search(r"\$(\d+(?:\.\d+)?)", body)
    first = body.strip().split(".")[0][:80]
    return {"order_id": order.group(1) if order else None,
            "amount": float(amount.group(1)) if amount else None, "summary": first}


def _draft(data: dict[str, Any]) -> dict[str, Any]:
    ticket = data.get("ticket", {})
    if "[storm]" in str(ticket.get("body", "")):
        # Rambling output that never fits the schema: the model writes until it reaches the
        # completion cap it was given, so each attempt spends its whole grant, and no more.
        raise ExecutorError("output is not valid JSON for Draft", kind="invalid_output",
                            retryable=True, usage=STORM)
    facts = data.get("facts") or {}
    label = data.get("label") or {}
    amount = facts.get("amount") or 0.0
    refund = amount if label.get("category") == "billing" else 0.0
    reply = (f"Hello, thanks for reaching out about: {facts.get('summary', 'your issue')}. "
             + (f"We will refund ${refund:.2f}." if refund else "We are on it."))
    if "guarantee" in str(ticket.get("body", "")).lower():
        reply += " We guarantee this will never happen again."
    return {"reply": reply, "refund": refund}


async def crm(task: Task) -> dict[str, Any]:
    """Customer lookup; a customer id ending in 9 is a VIP."""
    await asyncio.sleep(0.005)
    customer = str(task.input["customer_id"])
    return {"customer_id": customer, "vip": customer.endswith("9"),
            "tier": "gold" if customer.endswith("9") else "standard"}


async def orders(task: Task) -> dict[str, Any]:
    """Order history; unavailable for some customers (the branch fails, the join collects)."""
    await asyncio.sleep(0.005)
    customer = str(task.input["customer_id"])
    if customer.endswith("0"):
        raise PermanentError("order service: customer archived", kind="not_found")
    count = int(unit(customer) * 20)
    return {"orders": count, "last_order": f"ORD-{1000 + count}"}


FORBIDDEN = ("guarantee", "never happen again", "legal")


async def policy(task: Task) -> dict[str, Any]:
    """Deterministic policy check: no promises we cannot keep; big refunds need a human."""
    draft = task.input.get("draft") or {}
    reply = str(draft.get("reply", "")).lower()
    reasons = [f"reply contains {w!r}" for w in FORBIDDEN if w in reply]
    refund = float(draft.get("refund") or 0)
    risky = refund > 100
    if risky:
        reasons.append(f"refund of ${refund:.2f} needs approval")
    return {"ok": not any("contains" in r for r in reasons), "risky": risky, "reasons": reasons}


class Outbox:
    """Sends replies, idempotently: a retried or re-executed send is delivered once."""

    def __init__(self) -> None:
        self.sent: dict[str, dict[str, Any]] = {}
        self.escalated: dict[str, dict[str, Any]] = {}

    async def send(self, task: Task) -> dict[str, Any]:
        await asyncio.sleep(0.002)
        self.sent.setdefault(task.idempotency_key, dict(task.input))
        return {"delivered": True, "ticket": task.input.get("ticket"),
                "action": task.config.get("action", "reply")}

    async def escalate(self, task: Task) -> dict[str, Any]:
        await asyncio.sleep(0.002)
        self.escalated.setdefault(task.idempotency_key, dict(task.input))
        error = task.input.get("error") or {}
        limit = task.input.get("limit") or {}
        why = (limit.get("kind") and f"{limit['kind']} limit") or error.get("type") or "review"
        return {"queue": "tier-2", "ticket": task.input.get("ticket"), "why": why}
