"""Would the hot-path redesign reach issue 15's W1 target? A floor for the proposed design,
measured beside today's floor, the engine and Apache Burr in one run.

Issue 15 asks for W1 (per step in memory, every decision recorded and chained) at most 0.5
times Burr's per step, and names the design changes to weigh: events that are not pydantic
models, fewer events per step where two always travel together, one hash per committed
batch. Before changing the event model, this measures what those changes can buy at best:

- `floor`: engine_floor's sequential floor on `memory://` (today's design: five pydantic
  events per step, each folded, each serialized and hashed, one append through the library's
  in-memory recorder via the store worker, the executor under a timeout scope);
- `redesign`: the same loop with the proposed design: three slotted dataclass events per
  step (StepScheduled folded into AttemptStarted, AttemptSucceeded into StepCompleted),
  built without validation, folded by the same copy-the-fields mechanics as
  `domain.state.evolve` (a new run state and a new step state per event), each serialized
  by orjson natively and one SHA-256 per batch over the batch's bodies, appended as one
  write through the same store worker, the executor under the same timeout scope;
- `rulebound`: the engine itself on W1 (benchmarks/run.py's case);
- `burr`: Apache Burr on W1, as `make bench` runs it (needs `.venv-bench`).

Neither floor has a decider, definitions, limits, timers or locks: each is a lower bound for
an engine of its design. Each case runs in a fresh process, rounds interleaved; the median of
`--repeat` rounds is printed with every sample, and written to
benchmarks/results/redesign_floor.json.

    .venv-bench/bin/python -m benchmarks.redesign_floor --repeat 5
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import orjson

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
STEPS = 5
RUNS = 200
CASES = ("floor", "redesign", "rulebound", "burr")


# --- the proposed representation -----------------------------------------------------------

@dataclass(slots=True, frozen=True)
class AttemptStarted:  # StepScheduled and AttemptStarted, which always travel together
    at: datetime
    step: str
    visit: int
    attempt: int
    executor: str
    worker: str
    deadline: datetime
    not_before: datetime
    reason: str
    max_cost: float
    type: str = "AttemptStarted"


@dataclass(slots=True, frozen=True)
class StepCompleted:  # AttemptSucceeded and StepCompleted, likewise
    at: datetime
    step: str
    visit: int
    attempt: int
    output: Any
    latency: float
    type: str = "StepCompleted"


@dataclass(slots=True, frozen=True)
class TransitionTaken:
    at: datetime
    from_step: str
    to_step: str
    condition: str
    type: str = "TransitionTaken"


@dataclass(slots=True, frozen=True)
class RunCompleted:
    at: datetime
    output: Any
    reason: str
    type: str = "RunCompleted"


class Step:
    __slots__ = ("attempt", "key", "status", "visit")

    def __init__(self, key: str, status: str, visit: int, attempt: int) -> None:
        self.key, self.status, self.visit, self.attempt = key, status, visit, attempt


class State:
    """The fold's state: a new object per event, fields copied, as domain.state does."""

    def __init__(self) -> None:
        self.version = 0
        self.status = "running"
        self.updated_at: datetime | None = None
        self.steps: dict[str, Step] = {}
        self.current: str | None = None
        self.outputs: dict[str, Any] = {}
        self.steps_taken = 0
        self.attempts = 0
        self.output: Any = None


_new = object.__new__


def evolve(state: State, event: Any) -> State:
    values = state.__dict__.copy()
    kind = event.type
    if kind == "AttemptStarted":
        steps = dict(state.steps)
        steps[event.step] = Step(event.step, "running", event.visit, event.attempt)
        values["steps"], values["current"] = steps, event.step
        values["attempts"] = state.attempts + 1
    elif kind == "StepCompleted":
        steps = dict(state.steps)
        steps[event.step] = Step(event.step, "completed", event.visit, event.attempt)
        outputs = dict(state.outputs)
        outputs[event.step] = event.output
        values["steps"], values["outputs"] = steps, outputs
        values["steps_taken"] = state.steps_taken + 1
    elif kind == "TransitionTaken":
        values["current"] = event.to_step
    elif kind == "RunCompleted":
        values["status"], values["output"] = "completed", event.output
    values["version"] = state.version + 1
    values["updated_at"] = event.at
    new = _new(State)
    new.__dict__.update(values)
    return new


def _opts() -> int:
    return orjson.OPT_SORT_KEYS | orjson.OPT_UTC_Z


class RedesignRun:
    """One linear run: three events per step, one hash per committed batch."""

    def __init__(self, worker: Any) -> None:
        self.worker = worker
        self.run_id: UUID = uuid4()
        self.state = State()
        self.prev = "0" * 64
        self.ids = 0
        self.prefix = str(uuid4())[:24]

    async def commit(self, batch: list[Any]) -> None:
        from rulebound.engine.store import Record

        state = self.state
        for event in batch:
            state = evolve(state, event)
        opts = _OPTS
        bodies = [orjson.dumps(event, option=opts) for event in batch]
        digest = hashlib.sha256(self.prev.encode() + b"".join(bodies)).hexdigest()
        seq, records = self.state.version, []
        for body in bodies:
            seq += 1
            self.ids += 1
            data = b'{"event":%b,"batch_hash":"%b","id":"%b%012x"}' % (
                body, digest.encode(), self.prefix.encode(), self.ids)
            records.append(_tuple_new(Record, (self.run_id, seq, "E", data)))
        await self.worker.append(records)
        self.state, self.prev = state, digest

    async def run(self, executor: Any) -> None:
        now = datetime.now(UTC)
        await self.commit([_start("s0", now)])
        for i in range(STEPS):
            began = time.perf_counter()
            async with asyncio.timeout(60.0):
                output = await executor(None)
            latency = time.perf_counter() - began
            now = datetime.now(UTC)
            name = f"s{i}"
            nxt = f"s{i + 1}" if i + 1 < STEPS else None
            batch: list[Any] = [
                StepCompleted(now, name, 1, 1, output, latency),
                TransitionTaken(now, name, nxt or "end", "next")]
            batch.append(_start(nxt, now) if nxt else RunCompleted(now, output, "floor"))
            await self.commit(batch)
        assert self.state.status == "completed", self.state.status


_OPTS = _opts()
_tuple_new = tuple.__new__


def _start(name: str, now: datetime) -> AttemptStarted:
    return AttemptStarted(now, name, 1, 1, "work", "floor", now + timedelta(seconds=60), now,
                          "floor", 0.0)


# --- driver --------------------------------------------------------------------------------

def run_case(case: str, runs: int) -> dict[str, Any]:
    from benchmarks.engine_floor import sequential

    if case == "redesign":
        return asyncio.run(sequential("memory://", runs, RedesignRun))
    if case == "floor":
        return asyncio.run(sequential("memory://", runs))
    raise ValueError(case)


def _child(case: str, runs: int) -> float:
    if case in ("rulebound", "burr"):
        python = ROOT / ".venv-bench" / "bin" / "python"
        argv = [str(python), "-m", "benchmarks.run", "--case", case, "W1", "--runs",
                str(runs)]
    else:
        argv = [sys.executable, "-m", "benchmarks.redesign_floor", "--case", case,
                "--runs", str(runs)]
    out = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600,
                         check=True)
    return float(json.loads(out.stdout.strip().splitlines()[-1])["us_per_step"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--runs", type=int, default=RUNS)
    parser.add_argument("--case", choices=("floor", "redesign"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.runs)))
        return
    samples: dict[str, list[float]] = {c: [] for c in CASES}
    for rep in range(args.repeat):  # interleaved: every case once per round
        for case in CASES:
            samples[case].append(_child(case, args.runs))
        print(f"round {rep + 1}/{args.repeat}: " + ", ".join(
            f"{c} {samples[c][-1]:.1f}" for c in CASES), file=sys.stderr, flush=True)
    median = {c: statistics.median(v) for c, v in samples.items()}
    burr = median["burr"]
    print(f"W1, µs per step in memory, median of {args.repeat} (fresh process per case):")
    for case in CASES:
        print(f"  {case:<10} {median[case]:7.1f}  ({median[case] / burr:.2f}x Burr)  "
              f"samples {[round(v, 1) for v in samples[case]]}")
    print(f"  target (0.5x Burr): {burr / 2:.1f}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "redesign_floor.json").write_text(json.dumps(
        {"median_us_per_step": median, "samples": samples, "runs": args.runs,
         "repeat": args.repeat}, indent=2) + "\n")


if __name__ == "__main__":
    main()
