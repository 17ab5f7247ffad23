"""The registry the console tests serve: the demo's triage workflow (so the demo store's runs
show and verify) and a refund workflow whose approval waits long enough for a browser to
answer it, on an executor configured with a canary secret."""

from __future__ import annotations

import os
from typing import Any

from pydantic import BaseModel
from rulebound.adapters.demo.run import demo_registry
from rulebound.domain import END, FAIL, Retry, Route, Step, WaitForSignal, Workflow, field
from rulebound.engine import Registry
from rulebound.engine.executor import Result, RetryableError, Task, Usage

CANARY = os.environ.get("CONSOLE_CANARY", "")


class Refund(BaseModel):
    order: str
    amount: float


class Approval(BaseModel):
    approved: bool
    by: str
    note: str = ""


class Ledger:
    """A payment back end reached with an API key: the key is a secret it declares (the
    engine scrubs it from stored messages). Its first attempt per visit fails with a message
    that quotes the key, as careless clients do."""

    def __init__(self, api_key: str) -> None:
        self._api_key = api_key

    def __repr__(self) -> str:
        return "Ledger()"

    def secret_values(self) -> list[str]:
        return [self._api_key]

    async def __call__(self, task: Task) -> Result:
        if task.attempt == 1:
            raise RetryableError(f"ledger busy (key {self._api_key} rate limited)",
                                 kind="rate_limited")
        return Result(output={"checked": True, "order": task.input["order"]},
                      usage=Usage(tokens_in=120, tokens_out=30, cost=0.0021))


async def pay(data: dict[str, Any]) -> dict[str, Any]:
    return {"paid": data["amount"]}


refund = Workflow(
    "refund",
    description="Check a refund with the ledger, wait for a human, then pay.",
    input_schema=Refund,
    on_failure=FAIL,
    steps=[
        Step("check", executor="ledger", input={"order": "input.order"}, timeout=5,
             retry=Retry(attempts=3, backoff=0.01, on=("rate_limited",)),
             next="approval"),
        WaitForSignal("approval", signal="approval", timeout=600, output=Approval,
                      on_timeout="rejected",
                      routes=[Route("pay", when=field("approval.approved").is_true())],
                      next="rejected"),
        Step("pay", executor="payments", input={"amount": "input.amount"}, timeout=5,
             next=END),
        Step("rejected", executor="payments", input={"amount": "input.amount"}, timeout=5,
             config={"action": "reject"}, next=END),
    ],
)


def _registry() -> Registry:
    registry = demo_registry()
    registry.add(refund)
    registry.executors.update({"ledger": Ledger(CANARY), "payments": pay})
    return registry


registry = _registry()
