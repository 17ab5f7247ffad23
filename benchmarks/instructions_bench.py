"""Instructions per step, counted with callgrind: repeatable where wall time is not.

    .venv/bin/python benchmarks/instructions_bench.py [--runs 40,200] [--store sqlite]

The case: one engine on the memory store, a five-step chain of no-op function steps (the
same workflow as engine_bench's per-step case), one warm-up run, then N runs one after
another. It runs under `valgrind --tool=callgrind` twice, with two values of N, in fresh
processes (PYTHONHASHSEED=0); the difference of the two totals divided by the difference in
steps is the cost of one step, with the interpreter's start, the imports, opening and
closing the engine cancelled out. Callgrind counts instructions executed (Ir), not time: it
does not see cache misses or the machine's other load, so it is the figure to compare
commits by on a shared machine, not a latency.

--store sqlite runs the same case on a fresh SQLite file (every thread's instructions are
counted, the store's writer thread's included; the time fsync takes is not) and writes
instructions_sqlite.json.

Peak memory: callgrind's own process is not the case's, so the same case with the larger N
runs once more without valgrind in a fresh process, which reports its own peak (VmHWM).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import memory  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
STEPS = 5


async def case(runs: int, store: str = "memory://") -> None:
    from rulebound.engine import Engine

    from benchmarks.engine_bench import linear

    async def noop(task: Any) -> Any:
        return None

    async with Engine(store, [linear(STEPS)], {"work": noop}) as engine:
        await engine.wait(await engine.start("bench-linear"))  # warm-up
        for _ in range(runs):
            view = await engine.wait(await engine.start("bench-linear"))
            assert view.status == "completed", view


def _store_url(store: str, tmp: Path, runs: int) -> str:
    return "memory://" if store == "memory" else f"sqlite:///{tmp / f'case.{runs}.db'}"


def counted(runs: int, tmp: Path, store: str = "memory") -> int:
    """Instructions (Ir) of a fresh process that runs the case with `runs` runs."""
    out = tmp / f"callgrind.{runs}.out"
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    done = subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
                           sys.executable, __file__, "--case", str(runs),
                           "--store-url", _store_url(store, tmp, runs)], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"callgrind run failed: {done.stderr[-2000:]}")
    found = re.search(r"^(?:summary|totals):\s*(\d+)", out.read_text(), re.MULTILINE)
    if not found:
        raise SystemExit(f"no instruction total in {out}")
    return int(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="40,200", help="the two run counts, small,large")
    parser.add_argument("--store", choices=("memory", "sqlite"), default="memory")
    parser.add_argument("--case", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--store-url", default="memory://", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case is not None:
        asyncio.run(case(args.case, args.store_url))
        print(json.dumps(memory.process_peak()))
        return
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed (apt-get install valgrind)")
    small, large = (int(n) for n in args.runs.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        totals = {n: counted(n, Path(tmp), args.store) for n in (small, large)}
        per_step = (totals[large] - totals[small]) / ((large - small) * STEPS)
        native = subprocess.run([sys.executable, __file__, "--case", str(large), "--store-url",
                                 _store_url(args.store, Path(tmp), large + 1)], cwd=ROOT,
                                capture_output=True, text=True, check=True)
    peak = json.loads(native.stdout.strip().splitlines()[-1])
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    result = {"commit": commit, "store": args.store, "runs": [small, large],
              "steps_per_run": STEPS,
              "instructions_total": {str(n): v for n, v in totals.items()},
              "instructions_per_step": round(per_step),
              "peak_rss_mib": peak["peak_rss_mib"],
              "memory_how": f"VmHWM of the case with {large} runs in a fresh process, "
                            "without valgrind"}
    print(f"instructions per step ({args.store} store, {STEPS}-step no-op chain; callgrind, "
          f"({large} - {small} runs)): {per_step / 1000:,.0f}k   at {commit}\n"
          f"totals: {small} runs {totals[small]:,}, {large} runs {totals[large]:,}\n"
          f"{memory.line(peak)}")
    RESULTS.mkdir(exist_ok=True)
    name = "instructions.json" if args.store == "memory" else f"instructions_{args.store}.json"
    (RESULTS / name).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
