"""The demo workflow: support-ticket triage.

classify -> extract -> enrich (CRM and order history in parallel) -> draft -> policy check
-> (risky: wait for a human approval) -> send; anything that fails, or runs out of budget,
is escalated to a human queue. The model only fills bounded tasks; every route is declared.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field
from rulebound.domain import (
    END,
    FAIL,
    Limits,
    Parallel,
    Retry,
    Route,
    Step,
    WaitForSignal,
    Workflow,
    field,
)


class Ticket(BaseModel):
    id: str
    customer_id: str
    subject: str
    body: str


class Classification(BaseModel):
    category: Literal["billing", "technical", "account", "spam"]
    urgency: Literal["low", "high"]
    confidence: float = Field(ge=0, le=1)


class Extraction(BaseModel):
    order_id: str | None = None
    amount: float | None = None
    summary: str


class Draft(BaseModel):
    reply: str
    refund: float = Field(ge=0)


class PolicyVerdict(BaseModel):
    ok: bool
    risky: bool
    reasons: list[str]


class Approval(BaseModel):
    approved: bool
    by: str
    note: str = ""


TRANSIENT = ("rate_limited", "server_error", "timeout", "connection")

triage = Workflow(
    "support-triage",
    description="Classify a support ticket, draft a reply, check it, and send or escalate.",
    input_schema=Ticket,
    limits=Limits(max_cost=0.05, max_tokens=20_000, max_steps=20, deadline=300),
    on_failure="escalate",
    on_limit="escalate",
    steps=[
        Step("classify", executor="llm", output=Classification, timeout=20,
             input={"subject": "input.subject", "body": "input.body"},
             config={"prompt": "Classify this support ticket.\n{subject}\n{body}"},
             retry=Retry(attempts=4, backoff=0.05, max_backoff=1, on=TRANSIENT),
             cost=0.004, max_tokens=400,
             routes=[Route("close", when=field("classify.category") == "spam")],
             next="extract"),
        Step("extract", executor="llm", output=Extraction, timeout=20,
             input={"body": "input.body"},
             config={"prompt": "Extract the order id, amount and a one-line summary.\n{body}"},
             retry=Retry(attempts=2, backoff=0.05, on=(*TRANSIENT, "invalid_output")),
             cost=0.004, max_tokens=500, next="enrich"),
        Parallel("enrich", on_branch_failure="collect", next="draft", branches=[
            Step("customer", executor="crm", input={"customer_id": "input.customer_id"},
                 timeout=5, retry=Retry(attempts=3, backoff=0.02, on=TRANSIENT)),
            Step("orders", executor="orders", input={"customer_id": "input.customer_id"},
                 timeout=5, retry=Retry(attempts=3, backoff=0.02, on=TRANSIENT)),
        ]),
        Step("draft", executor="llm", output=Draft, timeout=30,
             input={"ticket": "input", "facts": "extract", "context": "enrich",
                    "label": "classify"},
             config={"prompt": "Draft a reply to {ticket.subject} given {facts.summary}."},
             retry=Retry(attempts=5, backoff=0.05, max_backoff=1,
                         on=(*TRANSIENT, "invalid_output")),
             cost=0.012, max_tokens=1200, next="policy"),
        Step("policy", executor="policy", output=PolicyVerdict, timeout=5,
             input={"draft": "draft", "label": "classify"},
             routes=[Route("escalate", when=field("policy.ok") == False),  # noqa: E712
                     Route("approval", when=field("policy.risky").is_true())],
             next="send"),
        WaitForSignal("approval", signal="approval", timeout=10, output=Approval,
                      on_timeout="escalate",
                      routes=[Route("send", when=field("approval.approved").is_true())],
                      next="escalate"),
        Step("send", executor="mailer", input={"ticket": "input.id", "reply": "draft.reply"},
             timeout=5, retry=Retry(attempts=3, backoff=0.02, on=TRANSIENT), next=END),
        Step("close", executor="mailer", input={"ticket": "input.id"}, timeout=5,
             config={"action": "close"}, next=END),
        Step("escalate", executor="human_queue",
             input={"ticket": "input.id", "error": "error", "limit": "limit"},
             timeout=5, retry=Retry(attempts=3, backoff=0.02), next=END, on_failure=FAIL),
    ],
)
