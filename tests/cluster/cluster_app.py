"""The --app the cluster test serves from every replica: a run of plain steps, a parallel
step and a signal wait. Every executor call is appended (and fsynced) to a ledger file
outside the engine before it works, so the test counts executions independently of the log.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from typing import Any

from rulebound import (
    END,
    FAIL,
    Limits,
    Parallel,
    Registry,
    Retry,
    Step,
    Task,
    WaitForSignal,
    Workflow,
)

_LEDGER = os.environ.get("RULEBOUND_CLUSTER_LEDGER", "ledger.jsonl")
_fd: int | None = None


async def work(task: Task) -> Any:
    global _fd
    if _fd is None:
        _fd = os.open(_LEDGER, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    line = {"pid": os.getpid(), "key": task.idempotency_key, "step": task.step,
            "attempt": task.attempt}
    os.write(_fd, (json.dumps(line) + "\n").encode())
    os.fsync(_fd)
    roll = int(hashlib.sha256(f"{task.idempotency_key}:{task.attempt}".encode())
               .hexdigest()[:8], 16)
    await asyncio.sleep(0.05 + (roll % 200) / 1000)
    return {"step": task.step}


_retry = Retry(attempts=3, on=("rate_limited", "server_error"))
workflow = Workflow("cluster", on_failure=FAIL, limits=Limits(deadline=900), steps=[
    Step("a", executor="work", retry=_retry, next="p"),
    Parallel("p", next="ok", branches=(
        Step("p1", executor="work", retry=_retry), Step("p2", executor="work", retry=_retry))),
    WaitForSignal("ok", signal="go", timeout=900, next="b"),
    Step("b", executor="work", retry=_retry, next=END)])

registry = Registry(workflows=[workflow], executors={"work": work})
