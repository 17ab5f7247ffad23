"""Parked runs at scale: N runs waiting for an approval on SQLite.

Creates N runs of a one-signal workflow (they park: nothing to do until the signal), then
measures, in a fresh process: RSS of an empty engine vs one opened on the N-run store,
open() time, and the time from a signal to the run's completion for a sample of runs while
all the others keep waiting. Peak RSS: VmHWM of the measuring process (fresh: an empty
engine, then the N-run store) and of the creating process (this one). The issue's figures
before parking: 5.7-7.2 KB RSS per waiting run (777 MB at 100,000) and open() about 1.1 ms
per run (112 s at 100,000).

    .venv/bin/python benchmarks/parked_bench.py [--runs 100000] [--out PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
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


def _workflow() -> Any:
    from rulebound import END, FAIL, WaitForSignal, Workflow

    return Workflow("approval", on_failure=FAIL, steps=[
        WaitForSignal("ok", signal="go", timeout=30 * 86400, next=END)])


def _rss_kb() -> float:
    return memory.rss_mib() * 1024


async def create(url: str, runs: int) -> dict[str, Any]:
    from rulebound import Engine

    began = time.perf_counter()
    async with Engine(url, [_workflow()], {}, park_after=0.0, max_active_runs=runs + 1,
                      keep_finished=0) as engine:
        batch = 2000
        ids = []
        for start in range(0, runs, batch):
            ids += await asyncio.gather(*(engine.start("approval", {"i": i})
                                          for i in range(start, min(runs, start + batch))))
            print(f"  created {len(ids)}/{runs}", file=sys.stderr, flush=True)
        async with asyncio.timeout(600):  # until every run has parked (a public gauge)
            while engine.active_runs:  # noqa: ASYNC110
                await asyncio.sleep(0.2)
    return {"created": len(ids), "create_seconds": round(time.perf_counter() - began, 1),
            "sample": [str(r) for r in ids[:: max(1, runs // 200)]]}


async def measure(url: str, sample: list[str]) -> dict[str, Any]:
    from rulebound import Engine

    empty_dir = tempfile.mkdtemp()
    async with Engine(f"sqlite:///{empty_dir}/empty.db", [_workflow()], {}):
        empty_rss = _rss_kb()
    began = time.perf_counter()
    engine = Engine(url, [_workflow()], {}, park_after=0.0)
    await engine.open()
    opened = time.perf_counter() - began
    rss = _rss_kb()
    latencies = []
    try:
        for run_id in sample:
            t0 = time.perf_counter()
            await engine.signal(run_id, "go")
            view = await engine.wait(run_id, timeout=30)
            assert view.status == "completed", view
            latencies.append(time.perf_counter() - t0)
        live = engine.active_runs
    finally:
        await engine.close()
    latencies.sort()
    return {"open_seconds": round(opened, 3), "rss_empty_mb": round(empty_rss / 1024, 1),
            "rss_open_mb": round(rss / 1024, 1),
            "rss_above_empty_mb": round((rss - empty_rss) / 1024, 1),
            "signal_to_end_ms_p50": round(latencies[len(latencies) // 2] * 1000, 2),
            "signal_to_end_ms_p99": round(
                latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] * 1000, 2),
            "signal_to_end_ms_mean": round(statistics.mean(latencies) * 1000, 2),
            "live_runs_after": live,
            "measure_peak_rss_mib": memory.process_peak()["peak_rss_mib"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100_000)
    parser.add_argument("--store", help="an existing store URL (skip creating)")
    parser.add_argument("--phase", choices=["all", "measure"], default="all")
    parser.add_argument("--sample-file")
    parser.add_argument("--out", default=str(RESULTS / "parked.json"),
                        help="where to write the JSON (default benchmarks/results/parked.json)")
    args = parser.parse_args()
    if args.phase == "measure":
        sample = json.loads(Path(args.sample_file).read_text())
        print(json.dumps(asyncio.run(measure(args.store, sample))))
        return
    tmp = tempfile.mkdtemp()
    url = args.store or f"sqlite:///{tmp}/parked.db"
    made = asyncio.run(create(url, args.runs))
    made["create_peak_rss_mib"] = memory.process_peak()["peak_rss_mib"]
    sample_file = Path(tmp) / "sample.json"
    sample_file.write_text(json.dumps(made.pop("sample")))
    out = subprocess.run([sys.executable, __file__, "--phase", "measure", "--store", url,
                          "--sample-file", str(sample_file)], capture_output=True, text=True,
                         check=True, cwd=ROOT, env={**os.environ})
    result = {"runs": args.runs, **made, **json.loads(out.stdout.strip().splitlines()[-1])}
    path = url.removeprefix("sqlite:///")
    if os.path.exists(path):
        result["store_mb"] = round(os.path.getsize(path) / 2**20, 1)
    print(json.dumps(result, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    if not args.store:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
