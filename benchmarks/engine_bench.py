"""rulebound's own figures: orchestration overhead, concurrency, replay speed, loop lag.

    .venv/bin/python benchmarks/engine_bench.py [--repeat 3]

Each case runs in a fresh process, `--repeat` rounds of all cases interleaved (so a noisy
minute hits every case alike); the table shows the median with min and max, and the JSON goes
to benchmarks/results/engine.json. Each workload also runs as its floor (engine_floor.py: the
work the design requires per step, with no engine), and the table ends with engine / floor.
Timings are not asserted anywhere: machines are shared and noisy, so read them as figures and
compare ratios measured side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rulebound.domain import END, FAIL, Limits, Route, Step, Workflow, field  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def linear(steps: int = 5) -> Workflow:
    return Workflow("bench-linear", on_failure=FAIL, steps=[
        Step(f"s{i}", executor="work", next=f"s{i + 1}" if i + 1 < steps else END)
        for i in range(steps)])


async def _noop(task: Any) -> Any:
    return None


async def _sleep10(task: Any) -> Any:
    await asyncio.sleep(0.010)
    return None


async def case_sequential(store: str, runs: int) -> dict[str, float]:
    """W1/W2 shape: runs one after another, 5 instant steps each."""
    from rulebound.engine import Engine

    async with Engine(store, [linear()], {"work": _noop}) as engine:
        await engine.wait(await engine.start("bench-linear"))  # warm-up
        began = time.perf_counter()
        for _ in range(runs):
            await engine.wait(await engine.start("bench-linear"))
        elapsed = time.perf_counter() - began
        commits = engine.storage.commits
    steps = runs * 5
    return {"us_per_step": elapsed / steps * 1e6, "steps_per_s": steps / elapsed,
            "commits": commits}


async def case_concurrent(store: str, runs: int) -> dict[str, float]:
    """W3 shape: all runs at once, 5 steps of 10 ms each; ideal wall time is 50 ms."""
    from rulebound.engine import Engine

    from benchmarks.common import LagProbe

    async with Engine(store, [linear()], {"work": _sleep10}, max_concurrency=2000) as engine:
        await engine.wait(await engine.start("bench-linear"))
        probe = LagProbe()
        probe.start()
        began = time.perf_counter()
        ids = await asyncio.gather(*(engine.start("bench-linear") for _ in range(runs)))
        views = await asyncio.gather(*(engine.wait(r) for r in ids))
        elapsed = time.perf_counter() - began
        lag = await probe.stop()
        assert all(v.status == "completed" for v in views)
        commits, batched = engine.storage.commits, engine.storage.batched_writes
    return {"wall_ms": elapsed * 1e3, "ratio_to_ideal": elapsed / 0.050, **lag,
            "commits": commits, "writes_sharing_a_commit": batched}


async def case_replay(events_wanted: int) -> dict[str, float]:
    """Fold speed: decode stored bytes and fold a run of `events_wanted` events."""
    from rulebound.domain import Simulator
    from rulebound.domain.state import replay
    from rulebound.engine import codec

    wf = Workflow("bench-loop", limits=Limits(max_steps=10_000), on_failure=FAIL, steps=[
        Step("a", executor="x", max_visits=10_000,
             routes=[Route("a", when=field("a.more").is_true())], next=END)])
    sim = Simulator(wf)
    sim.start({"n": 1})
    while len(sim.history) < events_wanted:
        for key in sim.ready():
            sim.start_attempt(key)
        for key in sim.running():
            sim.succeed(key, {"more": True})
    history = sim.history[:events_wanted]
    stored, prev = [], codec.GENESIS_HASH
    for i, event in enumerate(history):
        prev, data = codec.stamp(event, __import__("uuid").UUID(int=i + 1), prev)
        stored.append(data)
    began = time.perf_counter()
    decoded = [codec.decode(d) for d in stored]
    decode_s = time.perf_counter() - began
    began = time.perf_counter()
    replay(decoded)
    fold_s = time.perf_counter() - began
    return {"events": len(history), "fold_ms": fold_s * 1e3,
            "decode_and_fold_ms": (decode_s + fold_s) * 1e3,
            "events_per_s": len(history) / (decode_s + fold_s)}


CASES = {
    "per-step, memory (200 runs x 5 steps, no-op)":
        ("sequential", "memory://", 200, {"us_per_step": 40.0}),
    "per-step, SQLite durable (200 runs x 5 steps, no-op)":
        ("sequential", "sqlite", 200, {"us_per_step": 400.0}),
    "200 concurrent runs x 5 x 10 ms, memory":
        ("concurrent", "memory://", 200, {"ratio_to_ideal": 1.5, "loop_lag_p99_ms": 20.0}),
    "200 concurrent runs x 5 x 10 ms, SQLite":
        ("concurrent", "sqlite", 200, {"ratio_to_ideal": 1.5, "loop_lag_p99_ms": 20.0}),
    "replay a 10,240-event run": ("replay", "", 10_240, {}),
    # The same workloads with only the work the design requires per step and no engine
    # (benchmarks/engine_floor.py): a lower bound for the figures above, in the same run.
    "floor: per-step, memory": ("floor-sequential", "memory://", 200, {}),
    "floor: per-step, SQLite durable": ("floor-sequential", "sqlite", 200, {}),
    "floor: 200 concurrent runs, memory": ("floor-concurrent", "memory://", 200, {}),
    "floor: 200 concurrent runs, SQLite": ("floor-concurrent", "sqlite", 200, {}),
    "floor: each part of a step alone (us per step)": ("floor-primitives", "", 5000, {}),
}


FLOOR_PAIRS = [
    ("per-step, memory (200 runs x 5 steps, no-op)", "floor: per-step, memory", "us_per_step"),
    ("per-step, SQLite durable (200 runs x 5 steps, no-op)", "floor: per-step, SQLite durable",
     "us_per_step"),
    ("200 concurrent runs x 5 x 10 ms, memory", "floor: 200 concurrent runs, memory",
     "wall_ms"),
    ("200 concurrent runs x 5 x 10 ms, SQLite", "floor: 200 concurrent runs, SQLite",
     "wall_ms"),
]


def run_case(kind: str, store: str, n: int) -> dict[str, float]:
    from benchmarks import engine_floor

    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/bench.db" if store == "sqlite" else store
        if kind == "floor-sequential":
            return asyncio.run(engine_floor.sequential(url, n))
        if kind == "floor-concurrent":
            return asyncio.run(engine_floor.concurrent(url, n))
        if kind == "floor-primitives":
            return asyncio.run(engine_floor.primitives(Path(tmp) / "raw.db", n))
        if kind == "sequential":
            return asyncio.run(case_sequential(url, n))
        if kind == "concurrent":
            return asyncio.run(case_concurrent(url, n))
        return asyncio.run(case_replay(n))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--case", help="run one case in this process (internal)")
    args = parser.parse_args()
    if args.case:
        from benchmarks import memory

        kind, store, n, _ = CASES[args.case]
        result = run_case(kind, store, n)
        print(json.dumps({**result, "peak_rss_mib": memory.process_peak()["peak_rss_mib"]}))
        return
    results: dict[str, Any] = {}
    all_samples: dict[str, list[dict[str, float]]] = {name: [] for name in CASES}
    for round_ in range(args.repeat):
        for name in CASES:  # a fresh process per case and round
            out = subprocess.run([sys.executable, __file__, "--case", name],
                                 capture_output=True, text=True, check=True, cwd=ROOT)
            all_samples[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"  [{round_ + 1}/{args.repeat}] {name}: {all_samples[name][-1]}",
                  file=sys.stderr)
    for name, samples in all_samples.items():
        keys = samples[0].keys()
        results[name] = {k: {"median": statistics.median(s[k] for s in samples),
                             "min": min(s[k] for s in samples),
                             "max": max(s[k] for s in samples)} for k in keys}
        results[name]["targets"] = CASES[name][3]
    meta = {"machine": f"{platform.machine()} {os.cpu_count()} cores",
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"),
            "repeat": args.repeat}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "engine.json").write_text(json.dumps({"meta": meta, "results": results},
                                                    indent=2))
    print(f"\nrulebound engine benchmarks — {meta['machine']}, Python {meta['python']}, "
          f"{meta['date']}, median of {args.repeat} (min-max); peak_rss_mib: VmHWM of "
          "the case's fresh process, interpreter and imports included\n")
    for name, metrics in results.items():
        print(name)
        targets = metrics.pop("targets")
        for key, value in metrics.items():
            target = targets.get(key)
            verdict = ""
            if target is not None:
                verdict = f"   target <= {target:g}: " + ("met" if value["median"] <= target
                                                          else "MISSED")
            print(f"    {key:<26} {value['median']:>12.2f}  ({value['min']:.2f}-"
                  f"{value['max']:.2f}){verdict}")
    print("\nengine / floor (medians; the floor is a lower bound for this design here)")
    for engine_case, floor_case, key in FLOOR_PAIRS:
        value = results[engine_case][key]["median"] / results[floor_case][key]["median"]
        print(f"    {engine_case:<56} {key:<16} {value:6.2f}x")
    print(f"\nJSON: {RESULTS / 'engine.json'}")


if __name__ == "__main__":
    main()
