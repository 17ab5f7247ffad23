"""10,000 attempts in flight at once: how late the event loop runs, and memory per run.

Starts N runs of one step whose executor sleeps 1 s, all at once (max_concurrency = N), on
memory and on SQLite; each run's caller starts it and then waits for it, so the callers' own
burst (10,000 coroutines and tasks) happens while starting, not while in flight. A probe on
the same loop asks for a 10 ms sleep over and over and records how late it wakes (loop lag);
RSS is read before the runs and at the peak. Garbage-collector pauses are recorded too (a
full collection of 10,000 runs' objects stalls the loop, whatever the engine does). Each
store's case runs in a fresh process, which also reports its peak RSS (VmHWM). The engine
keeps its defaults but for the limits the load needs (`max_concurrency`, `max_active_runs`)
and parking (off: the runs must stay in flight); so each caller's `wait` is answered from
the engine's cache of ended runs, as it would be in a service. Every run must complete.

    .venv/bin/python benchmarks/inflight_bench.py [--runs 10000] [--freeze-gc]

--freeze-gc (a diagnostic): once every attempt is in flight, gc.freeze() moves the objects
alive then out of the collector's reach, as a service with a large steady heap may do; what
lag is left is the loop's own work.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import memory  # noqa: E402


def _rss_kb() -> float:
    return memory.rss_mib() * 1024


async def case(url: str, runs: int, freeze_gc: bool = False) -> dict[str, Any]:
    from rulebound import END, FAIL, Engine, Step, Workflow

    started = asyncio.Event()
    count = 0

    async def sleepy(input: Any) -> Any:
        nonlocal count
        count += 1
        if count == runs:
            started.set()
        await asyncio.sleep(1.0)
        return {"ok": True}

    wf = Workflow("sleepy", on_failure=FAIL, steps=[Step("s", executor="sleepy", next=END)])
    lags: list[float] = []
    stop = asyncio.Event()

    async def probe() -> None:
        while not stop.is_set():
            began = time.perf_counter()
            await asyncio.sleep(0.01)
            lags.append(time.perf_counter() - began - 0.01)

    pauses: list[tuple[int, float]] = []  # (generation, seconds) of each collection
    collecting = [0.0]

    def on_gc(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            collecting[0] = time.perf_counter()
        else:
            pauses.append((info["generation"], time.perf_counter() - collecting[0]))

    async with Engine(url, [wf], {"sleepy": sleepy}, max_concurrency=runs,
                      max_active_runs=runs + 1, park_after=None) as engine:

        completed = 0

        async def one(i: int) -> None:
            # Each caller checks its run's end and keeps nothing: 10,000 views held until the
            # last run ends (as a gather of their results did) are the harness's memory.
            nonlocal completed
            view = await engine.wait(await engine.start("sleepy", {"i": i}), timeout=120)
            completed += view.status == "completed"

        rss0 = _rss_kb()
        probing = asyncio.create_task(probe())
        gc.callbacks.append(on_gc)
        began = time.perf_counter()
        ending = asyncio.gather(*(one(i) for i in range(runs)))
        await asyncio.wait_for(started.wait(), 120)
        during_starts, gc_starting = len(lags), len(pauses)  # measured while starting
        if freeze_gc:
            gc.freeze()
        peak = max(_rss_kb(), rss0)
        in_flight = engine.attempts_in_flight
        await ending
        if completed != runs:
            raise SystemExit(f"{url}: {completed} of {runs} runs completed")
        took = time.perf_counter() - began
        gc.callbacks.remove(on_gc)
        gc.unfreeze()
        peak = max(peak, _rss_kb())
        stop.set()
        await probing
    starting, running = sorted(lags[:during_starts]), sorted(lags[during_starts:])

    def full(found: list[tuple[int, float]]) -> dict[str, Any]:
        """Full (generation 2) collections: how many, the longest, all of them (ms)."""
        ms = [p * 1000 for g, p in found if g == 2]
        return {"n": len(ms), "max": round(max(ms, default=0.0), 1),
                "total": round(sum(ms), 1)}

    def ms(values: list[float], p: float) -> float | None:
        return round(values[int(p * (len(values) - 1))] * 1000, 2) if values else None

    return {"runs": runs, "gc_frozen_in_flight": freeze_gc, "in_flight_at_peak": in_flight,
            "seconds": round(took, 2),
            "loop_lag_ms_while_starting": {"p50": ms(starting, .5), "p99": ms(starting, .99),
                                           "max": ms(starting, 1.0), "n": len(starting)},
            "loop_lag_ms_while_in_flight": {"p50": ms(running, .5), "p99": ms(running, .99),
                                            "max": ms(running, 1.0), "n": len(running)},
            "full_gc_ms_while_starting": full(pauses[:gc_starting]),
            "full_gc_ms_while_in_flight": full(pauses[gc_starting:]),
            "rss_mb_before": round(rss0 / 1024, 1), "rss_mb_peak": round(peak / 1024, 1),
            "kb_per_run_in_flight": round((peak - rss0) / runs, 2),
            "peak_rss_mib": memory.process_peak()["peak_rss_mib"],
            "memory_how": "VmHWM of this case's fresh process"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--freeze-gc", action="store_true",
                        help="gc.freeze() once every attempt is in flight (a diagnostic)")
    parser.add_argument("--out", default=str(RESULTS / "inflight.json"))
    parser.add_argument("--case", choices=["memory", "sqlite"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:  # one store's case, in this fresh process
        with tempfile.TemporaryDirectory() as tmp:
            url = "memory://" if args.case == "memory" else f"sqlite:///{tmp}/inflight.db"
            print(json.dumps(asyncio.run(case(url, args.runs, args.freeze_gc))))
        return
    out = {}
    for store in ("memory", "sqlite"):
        argv = [sys.executable, __file__, "--case", store, "--runs", str(args.runs)]
        if args.freeze_gc:
            argv.append("--freeze-gc")
        done = subprocess.run(argv, capture_output=True, text=True, check=True, cwd=ROOT)
        out[store] = json.loads(done.stdout.strip().splitlines()[-1])
    print(json.dumps(out, indent=2))
    Path(args.out).parent.mkdir(exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
