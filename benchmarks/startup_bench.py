"""Start-up: the `rulebound` command (`--help`, `runs`), and a recovered run's next step.

    .venv/bin/python benchmarks/startup_bench.py [--repeat 5] [--ended 1000] [--recover 9]

Command start-up: each figure is the median wall time of `repeat` fresh processes (spawn to
exit, output discarded), run through the installed `rulebound` script next to this
interpreter; beside it the peak RSS of one more run under /usr/bin/time
(benchmarks/memory.py). The demo store is made once in a temporary directory by
`rulebound demo` (offline, scripted model).
Targets (issue 15): --help under 150 ms, runs under 300 ms.

Recovery (issue 15: a recovered run's next step within 5 ms of `open()` returning, for a
store with 1,000 ended runs): a process fills a SQLite store with `ended` one-step runs that
completed, starts one more whose executor hangs, and is SIGKILLed while that attempt is in
flight. Then `recover` fresh processes each open an engine on their own copy of that store
(the imports done before the clock starts) and record when `open()` was called, when it
returned, and when the recovered run's executor was called (the abandoned attempt run
again); a negative "after open() returned" means the executor was called before open()
returned. Then as many fresh processes time the store's parts of open() alone on fresh
copies (opening the file, the runs table brought up to date, the going runs listed), to show
where open() spends its time. Median and p95 over the processes, each with its peak RSS
(VmHWM of that fresh process).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import memory  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def command() -> list[str]:
    script = Path(sys.executable).with_name("rulebound")
    return [str(script)] if script.exists() else [sys.executable, "-m", "rulebound"]


def timed(args: list[str], cwd: Path, repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        began = time.perf_counter()
        subprocess.run([*command(), *args], cwd=cwd, check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        times.append((time.perf_counter() - began) * 1000)
    return times


def p95(values: list[float]) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(0.95 * (len(values) - 1)))]


# --- recovery: a store with N ended runs and one attempt in flight at the kill ----------------


def _workflow() -> Any:
    from rulebound import END, FAIL, Step, Workflow

    return Workflow("one", on_failure=FAIL, steps=[Step("s", executor="work", next=END)])


async def build(path: Path, ended: int) -> None:
    """Phase 1 (its own process, SIGKILLed at the end): N ended runs, then one that hangs."""
    from rulebound import Engine

    async def work(input: Any) -> Any:
        if input.get("hang"):
            print("in flight", flush=True)
            await asyncio.sleep(3600)
        return {"ok": True}

    async with Engine(f"sqlite:///{path}", [_workflow()], {"work": work}) as engine:
        for start in range(0, ended, 500):
            ids = await asyncio.gather(*(engine.start("one", {"i": i})
                                         for i in range(start, min(ended, start + 500))))
            await asyncio.gather(*(engine.wait(r) for r in ids))
        print(f"run {await engine.start('one', {'hang': True})}", flush=True)
        await asyncio.sleep(3600)


async def recover(path: Path, run_id: str) -> dict[str, Any]:
    """Phase 2 (a fresh process per sample): open the engine, time the recovered step."""
    from rulebound import Engine

    called: list[float] = []
    seen = asyncio.Event()

    async def work(input: Any) -> Any:
        called.append(time.perf_counter())
        seen.set()
        return {"ok": True}

    engine = Engine(f"sqlite:///{path}", [_workflow()], {"work": work})
    began = time.perf_counter()
    await engine.open()
    opened = time.perf_counter()
    try:
        await asyncio.wait_for(seen.wait(), 30)
        view = await engine.wait(run_id, timeout=30)
        if view.status != "completed":
            raise SystemExit(f"the recovered run is {view.status}")
    finally:
        await engine.close()
    return {"open_ms": (opened - began) * 1e3,
            "step_after_open_returned_ms": (called[0] - opened) * 1e3,
            "step_after_open_called_ms": (called[0] - began) * 1e3,
            "executor_calls": len(called),
            "peak_rss_mib": memory.process_peak()["peak_rss_mib"]}


def parts(path: Path) -> dict[str, Any]:
    """Where open()'s time goes, the store's parts timed alone (a fresh process per sample):
    opening the file the kill left, bringing the runs table up to date with the log, and
    listing the runs to recover, as open() does them (engine/storage.py, the SQLite store)."""
    from rulebound.adapters.stores import open_store
    from rulebound.engine.storage import StoreWorker

    began = time.perf_counter()
    store = open_store(f"sqlite:///{path}")
    opened = time.perf_counter()

    async def rest() -> tuple[float, float, int]:
        worker = StoreWorker(store)
        worker.start()
        t0 = time.perf_counter()
        await worker.project()
        t1 = time.perf_counter()
        going = store.runs_to_recover(-1.0, 500, 0)
        t2 = time.perf_counter()
        await worker.close(close_store=False)
        return t1 - t0, t2 - t1, len(going)

    project, listing, going = asyncio.run(rest())
    store.close()
    again = time.perf_counter()
    open_store(f"sqlite:///{path}").close()  # the same file after a clean close
    return {"open_store_ms": (opened - began) * 1e3, "project_ms": project * 1e3,
            "list_going_ms": listing * 1e3, "going_runs": going,
            "open_store_after_clean_close_ms": (time.perf_counter() - again) * 1e3}


def recovery(ended: int, samples: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base.db"
        child = subprocess.Popen([sys.executable, __file__, "--phase", "build", str(base),
                                  "--ended", str(ended)], cwd=ROOT, stdout=subprocess.PIPE,
                                 text=True)
        assert child.stdout is not None
        lines = []
        for text in child.stdout:  # "run <id>" and "in flight" (the executor runs), any order
            lines.append(text.strip())
            if "in flight" in lines and any(t.startswith("run ") for t in lines):
                break
        built = memory.peak_of(child.pid)  # VmHWM, read before the kill
        child.send_signal(signal.SIGKILL)
        child.wait()
        if "in flight" not in lines:
            raise SystemExit(f"phase 1 never had its attempt in flight: {lines}")
        run_id = next(text.split()[1] for text in lines if text.startswith("run "))
        out: list[dict[str, Any]] = []
        for i in range(samples):
            copy = Path(tmp) / f"copy{i}.db"
            for suffix in ("", "-wal", "-shm"):
                if Path(f"{base}{suffix}").exists():
                    shutil.copyfile(f"{base}{suffix}", f"{copy}{suffix}")
            done = subprocess.run([sys.executable, __file__, "--phase", "recover", str(copy),
                                   "--run", run_id], cwd=ROOT, capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"recovery sample failed: {done.stderr[-2000:]}")
            out.append(json.loads(done.stdout.strip().splitlines()[-1]))
        split: list[dict[str, Any]] = []
        for i in range(samples):  # the store's parts alone, on fresh copies again
            copy = Path(tmp) / f"parts{i}.db"
            for suffix in ("", "-wal", "-shm"):
                if Path(f"{base}{suffix}").exists():
                    shutil.copyfile(f"{base}{suffix}", f"{copy}{suffix}")
            done = subprocess.run([sys.executable, __file__, "--phase", "parts", str(copy)],
                                  cwd=ROOT, capture_output=True, text=True, check=True)
            split.append(json.loads(done.stdout.strip().splitlines()[-1]))
    keys = ("open_ms", "step_after_open_returned_ms", "step_after_open_called_ms",
            "peak_rss_mib")
    return {"ended_runs": ended, "processes": samples,
            "build_process_peak_rss_mib": built["peak_rss_mib"],
            **{k: {"median": statistics.median(s[k] for s in out),
                   "p95": p95([s[k] for s in out]), "min": min(s[k] for s in out),
                   "max": max(s[k] for s in out)} for k in keys},
            "parts": {k: {"median": statistics.median(s[k] for s in split),
                          "p95": p95([s[k] for s in split])}
                      for k in split[0] if k != "going_runs"},
            "samples": out, "parts_samples": split}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--ended", type=int, default=1000, help="ended runs in the store")
    parser.add_argument("--recover", type=int, default=9,
                        help="fresh processes for the recovery case (0: skip it)")
    parser.add_argument("--out", default=str(RESULTS / "startup.json"),
                        help="where to write the JSON (default benchmarks/results/startup.json)")
    parser.add_argument("--phase", nargs=2, metavar=("PHASE", "DB"), help=argparse.SUPPRESS)
    parser.add_argument("--run", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        if args.phase[0] == "build":
            asyncio.run(build(Path(args.phase[1]), args.ended))
        elif args.phase[0] == "parts":
            print(json.dumps(parts(Path(args.phase[1]))))
        else:
            print(json.dumps(asyncio.run(recover(Path(args.phase[1]), args.run))))
        return 0
    result: dict[str, Any] = {"commands": {}}
    with tempfile.TemporaryDirectory() as tmp:
        cwd = Path(tmp)
        subprocess.run([*command(), "demo", "--no-explain"], cwd=cwd, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for label, argv, target in (("rulebound --help", ["--help"], 150),
                                    ("rulebound runs (demo store)", ["runs"], 300)):
            timed(argv, cwd, 1)  # warm the file cache
            times = timed(argv, cwd, args.repeat)
            peak = memory.command_peak([*command(), *argv], cwd=cwd)
            result["commands"][label] = {"median_ms": statistics.median(times),
                                         "min_ms": min(times), "max_ms": max(times),
                                         "target_ms": target, **peak}
            print(f"{label:<30} median {statistics.median(times):6.0f} ms  "
                  f"(min {min(times):.0f}, max {max(times):.0f}; target < {target} ms)  "
                  f"{memory.line(peak)}", flush=True)
    if args.recover:
        rec = recovery(args.ended, args.recover)
        result["recovery"] = rec
        after, total = rec["step_after_open_returned_ms"], rec["step_after_open_called_ms"]
        print(f"recovered step, {args.ended} ended runs + 1 in flight at SIGKILL, "
              f"{args.recover} fresh processes:\n"
              f"  open() took                       median {rec['open_ms']['median']:7.2f} ms"
              f"  p95 {rec['open_ms']['p95']:7.2f} ms\n"
              f"  step called after open() returned median {after['median']:7.2f} ms"
              f"  p95 {after['p95']:7.2f} ms   (target <= 5 ms: "
              f"{'met' if after['p95'] <= 5 else 'MISSED'} at p95)\n"
              f"  step called after open() was called median {total['median']:7.2f} ms"
              f"  p95 {total['p95']:7.2f} ms\n"
              f"  peak RSS per process            median {rec['peak_rss_mib']['median']:.1f} MiB"
              f" (VmHWM of each fresh process); the process that built the store "
              f"{rec['build_process_peak_rss_mib']:.1f} MiB", flush=True)
        print("  where open() goes, the store's parts alone (median / p95 of fresh processes): "
              + ", ".join(f"{k} {v['median']:.1f} / {v['p95']:.1f}"
                          for k, v in rec["parts"].items()), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
