"""The process the crash test kills: an engine over SQLite driving many runs.

Every executor invocation is appended (and fsynced) to an external ledger before it does its
work, so the test can count executions independently of the event log. The chain mixes plain
steps with parallel steps (two branches in flight at once) and signal waits (answered by a
signaller in this process, which a kill can interrupt between any two of its calls).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import sys

from rulebound.domain import FAIL, Limits, Parallel, Retry, Step, WaitForSignal, Workflow
from rulebound.engine import Engine, RunTerminal

STEPS = 150  # long enough that 20 kills land mid-run (~19 s of work per run), not after the end


def _step(i: int) -> Step | Parallel | WaitForSignal:
    name, nxt = f"s{i}", f"s{i + 1}" if i + 1 < STEPS else "$end"
    # The README's shape: a crash is not among the kinds it retries, and needs not be.
    retry = Retry(attempts=100, backoff=0.001, max_backoff=0.01,
                  on=("rate_limited", "server_error"))
    if i % 10 == 5:
        return Parallel(name, next=nxt, branches=tuple(
            Step(f"{name}{b}", executor="work", timeout=30, retry=retry) for b in "ab"))
    if i % 10 == 8:
        return WaitForSignal(name, signal="go", timeout=3600, next=nxt)
    return Step(name, executor="work", timeout=30, retry=retry, next=nxt)


def workflow() -> Workflow:
    return Workflow("crash-chain", limits=Limits(max_steps=400, deadline=3600),
                    on_failure=FAIL, steps=[_step(i) for i in range(STEPS)])


def _write_atomically(path: str, text: str) -> None:
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


async def main(db: str, ledger_path: str, runs: int, report: str) -> None:
    ledger = os.open(ledger_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    async def work(task):
        line = json.dumps({"run": str(task.run_id), "step": task.step, "attempt": task.attempt,
                           "key": task.idempotency_key}) + "\n"
        os.write(ledger, line.encode())
        os.fsync(ledger)
        roll = int(hashlib.sha256(f"{task.idempotency_key}:{task.attempt}".encode())
                   .hexdigest()[:8], 16)
        await asyncio.sleep(0.05 + (roll % 150) / 1000)
        return {"step": task.step, "n": roll % 1000}

    async with Engine(f"sqlite:///{db}", workflows=[workflow()], executors={"work": work},
                      max_concurrency=64, drain_timeout=0.1) as engine:
        ids = [await engine.start("crash-chain", {"i": i}, idempotency_key=f"run-{i}")
               for i in range(runs)]
        print("STARTED", flush=True)

        async def signaller() -> None:  # answers every signal wait, like an approver would
            while True:
                for run_id in ids:
                    view = await engine.get(run_id)
                    if "go" in view.waiting_for:
                        with contextlib.suppress(RunTerminal):  # it ended meanwhile
                            await engine.signal(run_id, "go", {"approved": True})
                await asyncio.sleep(0.1)

        answering = asyncio.create_task(signaller())
        views = [await engine.wait(r) for r in ids]
        answering.cancel()
        text = json.dumps({str(v.run_id): v.to_dict() for v in views}, default=str)
        await asyncio.to_thread(_write_atomically, report, text)
    print("DONE", flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]))
