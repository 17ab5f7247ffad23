"""What would dropping one event per step buy? W1 with and without the StepCompleted that
always follows a task step's AttemptSucceeded.

Issue 15 asks to weigh "fewer events per step where two always travel together". For a task
step, the decider answers every AttemptSucceeded with a StepCompleted in the same write: it
has no choice to make. A rules version recorded in RunStarted could let the fold complete the
step on AttemptSucceeded instead, four events per step rather than five. Before deciding,
this measures what that buys through the engine itself: in the `four` case the fold of
AttemptSucceeded is swapped, in this benchmark's own process only, for one that also
completes the step (what StepCompleted's fold does), so the decider writes no StepCompleted;
everything else is the engine as shipped. `five` is the engine unchanged. Each round runs
both in fresh processes, interleaved; W1 is benchmarks/run.py's case (200 runs x 5 no-op
steps in memory, in sequence, every run checked for five successful attempts).

    .venv/bin/python benchmarks/fewer_events.py [--repeat 5] [--runs 1000]

Writes benchmarks/results/fewer_events.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CASES = ("five", "four")


def _complete_on_success() -> None:
    """The `four` case: AttemptSucceeded's fold completes its task step as well."""
    from rulebound.domain import events as ev
    from rulebound.domain import state

    folds: Any = state._FOLDS  # a what-if, measured here only; never shipped
    succeeded = folds[ev.AttemptSucceeded]

    def both(run: Any, event: Any, values: dict[str, Any]) -> None:
        succeeded(run, event, values)  # puts the step, succeeded, in a fresh copy of steps
        steps, step = values["steps"], values["steps"][event.step]
        steps[event.step] = state.replace(step, status="completed")
        if step.parent is None:  # StepCompleted's fold, on what AttemptSucceeded carries
            outputs = dict(run.outputs)
            outputs[step.name] = event.output
            values["outputs"] = outputs

    folds[ev.AttemptSucceeded] = both


def run_case(case: str, runs: int) -> dict[str, Any]:
    from benchmarks import rulebound_bench

    if case == "four":
        _complete_on_success()
    result = asyncio.run(rulebound_bench.sequential("memory", None, runs))
    return {"us_per_step": result["us_per_step"]}


def _child(case: str, runs: int) -> float:
    out = subprocess.run([sys.executable, "-m", "benchmarks.fewer_events", "--case", case,
                          "--runs", str(runs)], cwd=ROOT, capture_output=True, text=True,
                         timeout=600, check=True)
    return float(json.loads(out.stdout.strip().splitlines()[-1])["us_per_step"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.runs)))
        return
    samples: dict[str, list[float]] = {c: [] for c in CASES}
    for rep in range(args.repeat):
        for case in CASES:
            samples[case].append(_child(case, args.runs))
        print(f"round {rep + 1}/{args.repeat}: " + ", ".join(
            f"{c} {samples[c][-1]:.1f}" for c in CASES), file=sys.stderr, flush=True)
    median = {c: statistics.median(v) for c, v in samples.items()}
    change = median["four"] / median["five"] - 1
    print(f"W1, µs per step in memory, median of {args.repeat}: five events "
          f"{median['five']:.1f}, four {median['four']:.1f} ({change:+.1%})")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "fewer_events.json").write_text(json.dumps(
        {"median_us_per_step": median, "change": change, "samples": samples,
         "runs": args.runs, "repeat": args.repeat}, indent=2) + "\n")


if __name__ == "__main__":
    main()
