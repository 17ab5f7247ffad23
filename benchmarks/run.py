"""rulebound beside its peers on identical workloads, measured in the same run.

    make bench        # or: .venv-bench/bin/python benchmarks/run.py [--repeat 3]

Systems: rulebound, LangGraph (SQLite checkpointer), DBOS Transact (SQLite system database),
Apache Burr (SQLite persister), and the floors (bare asyncio, raw sqlite3). Workloads:

    W1  200 runs in sequence, 5 instant steps, in memory           -> us of orchestration/step
    W2  the same, durable on a SQLite file (WAL, synchronous=FULL)  -> us/step, steps/s
    W3  200 runs at once, 5 steps each awaiting 10 ms, memory and SQLite -> wall vs 50 ms
    W4  a durable run SIGKILLed while step 4 runs; restart          -> steps 1-3 re-run, time
    replay (rulebound only): decode and fold a 10,240-event run
    PG  200 runs at once x 5 x 10 ms on 1, 2 and 4 engine processes sharing one PostgreSQL,
        rulebound beside DBOS (benchmarks/pg_cluster_bench.py) -> steps/s, RSS per process

Every case runs in a fresh process; repetitions are interleaved (A B C A B C ...) so drift on
a shared machine hits every system alike; the table gives the median with min and max. A case
whose store does not hold what it claims (checked after every case) fails the whole run.
Every case also reports its peak memory: VmHWM of its fresh process (benchmarks/memory.py;
W4: the restarted process, and the killed one's as killed_peak_rss_mib).
Results: a table on stdout, JSON in benchmarks/results/peers.json (PG: pg_cluster.json).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import importlib.util
import json
import os
import platform
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import memory  # noqa: E402
from benchmarks.common import Ledger, NotPersisted, check  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
SYSTEMS = {  # name -> (module, the package that must be importable)
    "floor": ("benchmarks.floors", None),
    "rulebound": ("benchmarks.rulebound_bench", "engine"),
    "langgraph": ("benchmarks.peers.langgraph_bench", "langgraph.checkpoint.sqlite"),
    "dbos": ("benchmarks.peers.dbos_bench", "dbos"),
    "burr": ("benchmarks.peers.burr_bench", "burr"),
}
PEERS = ("langgraph", "dbos", "burr")
VERSIONS = ("langgraph", "langgraph-checkpoint", "langgraph-checkpoint-sqlite", "dbos",
            "apache-burr", "aiosqlite", "sqlalchemy", "eventsourcing", "pydantic")


@dataclass(frozen=True)
class Workload:
    key: str
    title: str
    kind: str  # sequential | concurrent | crash | replay
    store: str  # memory | sqlite
    systems: tuple[str, ...]
    headline: str  # the metric ratios are taken on (lower is better)
    shown: tuple[str, ...] = ()
    notes: dict[str, str] = field(default_factory=dict)


WORKLOADS = (
    Workload("W1", "W1 in memory: 200 runs x 5 instant steps, in sequence", "sequential",
             "memory", ("floor", "rulebound", "langgraph", "dbos", "burr"), "us_per_step",
             ("us_per_step",),
             {"dbos": "no in-memory mode: SQLite on tmpfs", "floor": "bare asyncio"}),
    Workload("W2", "W2 durable on SQLite: 200 runs x 5 instant steps, in sequence",
             "sequential", "sqlite", ("floor", "rulebound", "langgraph", "dbos", "burr"),
             "us_per_step", ("us_per_step", "steps_per_s", "batched_us_per_step"),
             {"floor": "raw sqlite3: 1 commit/step (batched: 200 rows/commit)"}),
    Workload("W3m", "W3 in memory: 200 runs at once x 5 steps x 10 ms (ideal 50 ms)",
             "concurrent", "memory", ("floor", "rulebound", "langgraph", "dbos", "burr"),
             "wall_ms", ("wall_ms", "ratio_to_ideal", "loop_lag_p99_ms"),
             {"dbos": "SQLite on tmpfs", "floor": "bare asyncio"}),
    Workload("W3s", "W3 on SQLite: 200 runs at once x 5 steps x 10 ms (ideal 50 ms)",
             "concurrent", "sqlite", ("rulebound", "langgraph", "dbos", "burr"), "wall_ms",
             ("wall_ms", "ratio_to_ideal", "loop_lag_p99_ms")),
    Workload("W4", "W4 recovery: SIGKILL while step 4 runs, restart on the same file", "crash",
             "sqlite", ("rulebound", "langgraph", "dbos", "burr"), "from_engine_start_ms",
             ("steps_1_3_rerun", "from_process_start_ms", "from_engine_start_ms")),
    Workload("R", "replay (rulebound only): decode and fold a 10,240-event run", "replay",
             "memory", ("rulebound",), "decode_and_fold_ms",
             ("events_per_s", "fold_ms", "decode_and_fold_ms")),
)
BY_KEY = {w.key: w for w in WORKLOADS}
PG = "PG"  # several engine processes on one PostgreSQL: its own driver, pg_cluster_bench.py
PG_SYSTEMS = ("rulebound", "dbos")


def module(system: str) -> Any:
    return importlib.import_module(SYSTEMS[system][0])


def available(system: str) -> str | None:
    """None if the system can run here, else why not (a missing optional package)."""
    needed = SYSTEMS[system][1]
    try:
        if needed and importlib.util.find_spec(needed) is None:
            return f"{needed} is not installed (make bench installs the bench extra)"
    except ModuleNotFoundError:
        return f"{needed} is not installed (make bench installs the bench extra)"
    return None


# --- inside a case process ------------------------------------------------------------------


def run_case(system: str, key: str, runs: int) -> dict[str, Any]:
    """One repetition of one workload for one system, in this (fresh) process, with the
    process's peak RSS (W4: the restarted process's, and the killed one's beside it)."""
    result = _run_case(system, key, runs)
    if BY_KEY[key].kind != "crash":
        result.update(memory.process_peak())
    return result


def _run_case(system: str, key: str, runs: int) -> dict[str, Any]:
    workload = BY_KEY[key]
    mod = module(system)
    # DBOS has no in-memory mode: its "memory" cases use a SQLite file on tmpfs.
    base = "/dev/shm" if workload.store == "memory" and Path("/dev/shm").is_dir() else None
    with tempfile.TemporaryDirectory(prefix="rb-bench-", dir=base) as tmp:
        db = Path(tmp) / "bench.db"
        if workload.kind == "sequential":
            return asyncio.run(mod.sequential(workload.store, db, runs))
        if workload.kind == "concurrent":
            return asyncio.run(mod.concurrent(workload.store, db, runs))
        if workload.kind == "crash":
            return crash_case(system, Path(tmp))
        return asyncio.run(mod.replay())


def crash_case(system: str, tmp: Path) -> dict[str, Any]:
    """W4: phase 1 runs until step 4 starts and is SIGKILLed; phase 2 restarts and resumes."""
    ledger = Ledger(tmp / "ledger.txt")
    def argv(phase: str) -> list[str]:
        return [sys.executable, __file__, "--phase", phase, system, str(tmp)]

    child = subprocess.Popen(argv("child"), cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not any(p[:2] == ["4", "start"] for p in ledger.lines()):
        if child.poll() is not None:
            raise NotPersisted(f"{system} W4 phase 1 exited before step 4: "
                               f"{child.stderr.read()[-2000:] if child.stderr else ''}")
        check(time.monotonic() < deadline, f"{system} W4 phase 1 never reached step 4")
        time.sleep(0.002)
    killed = memory.peak_of(child.pid)  # its VmHWM, read before the kill
    child.send_signal(signal.SIGKILL)
    child.wait()
    before = len(ledger.lines())
    first = [p[0] for p in ledger.lines() if p[1:2] == ["start"]]
    check(first == ["1", "2", "3", "4"], f"{system} W4 phase 1 ran steps {first}")
    spawned = time.time()
    out = subprocess.run(argv("restart"), cwd=ROOT, capture_output=True, text=True, timeout=180)
    # The restart prints its own peak (VmHWM of that fresh process) in its JSON line.
    if out.returncode != 0:
        raise NotPersisted(f"{system} W4 restart failed: {out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    after = ledger.lines()[before:]
    starts = [p for p in after if p[1:2] == ["start"]]
    rerun = sum(1 for p in starts if p[0] in ("1", "2", "3"))
    step4 = [float(p[2]) for p in starts if p[0] == "4"]
    engine = [float(p[1]) for p in after if p[0] == "engine"]
    check(bool(step4) and bool(engine), f"{system} W4 restart never started step 4")
    check([p[0] for p in starts][-2:] == ["4", "5"], f"{system} W4 restart ran {starts}")
    result.update({"killed_peak_rss_mib": killed["peak_rss_mib"],
                   "steps_1_3_rerun": rerun,
                   "from_process_start_ms": (step4[0] - spawned) * 1e3,
                   "from_engine_start_ms": (step4[0] - engine[0]) * 1e3})
    return result


def run_phase(phase: str, system: str, tmp: Path) -> None:
    mod = module(system)
    ledger = Ledger(tmp / "ledger.txt")
    db = tmp / "bench.db"
    if phase == "child":
        asyncio.run(mod.crash_child(db, ledger))
        raise SystemExit("phase 1 finished: it should have been killed")
    print(json.dumps({**asyncio.run(mod.crash_restart(db, ledger)), **memory.process_peak()}))


# --- the driver -----------------------------------------------------------------------------


def summarise(samples: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in samples[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            values = [s[key] for s in samples]
            out[key] = {"median": statistics.median(values), "min": min(values),
                        "max": max(values)}
    out["verified"] = samples[-1].get("verified", "")
    return out


def fmt(value: float) -> str:
    if value >= 10_000:
        return f"{value:,.0f}"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def ratios(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """rulebound / peer on each workload's headline metric, from the same run (< 1 = ahead)."""
    out: dict[str, dict[str, float]] = {}
    for workload in WORKLOADS:
        mine = results.get(workload.key, {}).get("rulebound", {}).get(workload.headline)
        if not mine:
            continue
        for peer in (*PEERS, "floor"):
            theirs = results[workload.key].get(peer, {}).get(workload.headline)
            if theirs and theirs["median"]:
                out.setdefault(workload.key, {})[peer] = mine["median"] / theirs["median"]
    return out


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 6's targets for rulebound, as ratios measured in this run."""
    def median(key: str, system: str, metric: str) -> float | None:
        value = results.get(key, {}).get(system, {}).get(metric)
        return value["median"] if value else None

    def fastest(key: str) -> tuple[str, float] | None:
        found = [(p, v) for p in PEERS if (v := median(key, p, "us_per_step")) is not None]
        return min(found, key=lambda pv: pv[1]) if found else None

    out: list[dict[str, Any]] = []
    for key, share, label in (("W1", 3, "W1 per step <= 1/3 of the fastest peer"),
                              ("W2", 5, "W2 per step <= 1/5 of the fastest durable peer")):
        mine, best = median(key, "rulebound", "us_per_step"), fastest(key)
        if mine is not None and best is not None:
            out.append({"target": label, "value": f"{mine / best[1]:.2f}x {best[0]}",
                        "met": mine * share <= best[1]})
    ratio = median("W3s", "rulebound", "ratio_to_ideal")
    if ratio is not None:
        out.append({"target": "W3 on SQLite within 2x of the ideal", "value": f"{ratio:.2f}x",
                    "met": ratio <= 2.0})
    rerun = results.get("W4", {}).get("rulebound", {}).get("steps_1_3_rerun")
    resume = median("W4", "rulebound", "from_engine_start_ms")
    if rerun is not None and resume is not None:
        out.append({"target": "W4 re-runs no completed step", "value": f"{rerun['max']:g}",
                    "met": rerun["max"] == 0})
        out.append({"target": "W4 step 4 within 100 ms of engine start",
                    "value": f"{resume:.0f} ms", "met": resume < 100})
    return out


def table(results: dict[str, Any], rat: dict[str, dict[str, float]]) -> str:
    lines = []
    for workload in WORKLOADS:
        if workload.key not in results:
            continue
        lines.append(f"\n{workload.title}")
        for system, metrics in results[workload.key].items():
            if "error" in metrics:
                lines.append(f"  {system:<10} {metrics['error']}")
                continue
            cells = []
            for key in workload.shown:
                if key in metrics:
                    m = metrics[key]
                    cells.append(f"{key} {fmt(m['median'])} ({fmt(m['min'])}-{fmt(m['max'])})")
            if "peak_rss_mib" in metrics:  # every case: its own fresh process's peak
                cells.append(f"peak RSS {fmt(metrics['peak_rss_mib']['median'])} MiB")
            ratio = rat.get(workload.key, {}).get(system)
            if ratio is not None:
                cells.append(f"rulebound/{system} {ratio:.2f}x")
            note = workload.notes.get(system)
            lines.append(f"  {system:<10} " + "   ".join(cells) + (f"   [{note}]" if note else ""))
    return "\n".join(lines)


def versions() -> dict[str, str]:
    found = {"python": platform.python_version(), "sqlite": sqlite3.sqlite_version}
    for name in VERSIONS:
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[name] = metadata.version(name)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True)
    found["rulebound"] = commit.stdout.strip() or "unknown"
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=int(os.environ.get("BENCH_REPEAT", 3)),
                        help="repetitions per case (env BENCH_REPEAT, default 3)")
    parser.add_argument("--runs", type=int, default=int(os.environ.get("BENCH_RUNS", 200)),
                        help="runs per case (env BENCH_RUNS, default 200)")
    parser.add_argument("--systems", default=os.environ.get("BENCH_SYSTEMS", ",".join(SYSTEMS)))
    parser.add_argument("--workloads", default=os.environ.get("BENCH_WORKLOADS",
                                                              ",".join([*BY_KEY, PG])))
    parser.add_argument("--pg-engines", default=os.environ.get("BENCH_PG_ENGINES", "1,2,4"),
                        help="PG: engine process counts (env BENCH_PG_ENGINES, default 1,2,4)")
    parser.add_argument("--out", default=str(RESULTS / "peers.json"))
    parser.add_argument("--case", nargs=2, metavar=("SYSTEM", "WORKLOAD"), help=argparse.SUPPRESS)
    parser.add_argument("--phase", nargs=3, metavar=("PHASE", "SYSTEM", "DIR"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        run_phase(args.phase[0], args.phase[1], Path(args.phase[2]))
        return
    if args.case:
        print(json.dumps(run_case(args.case[0], args.case[1], args.runs)))
        return

    wanted = set(args.systems.split(","))
    keys = [k for k in args.workloads.split(",") if k]
    unknown = (wanted - set(SYSTEMS)) | (set(keys) - {*BY_KEY, PG})
    if unknown:
        parser.error(f"unknown systems or workloads: {', '.join(sorted(unknown))}")
    skipped = {s: why for s in wanted if (why := available(s))}
    plan = [(w, s) for w in WORKLOADS if w.key in keys for s in w.systems
            if s in wanted and s not in skipped]
    for system, why in sorted(skipped.items()):
        print(f"skipping {system}: {why}", file=sys.stderr)
    total = len(plan) * args.repeat
    samples: dict[tuple[str, str], list[dict[str, Any]]] = {}
    errors: dict[tuple[str, str], str] = {}
    done, began = 0, time.monotonic()
    for rep in range(args.repeat):  # interleaved: every system once per repetition
        for workload, system in plan:
            done += 1
            if (workload.key, system) in errors:
                continue
            label = f"[{done}/{total}] {workload.key} {system} (rep {rep + 1}/{args.repeat})"
            print(f"{label} ...", end="", flush=True, file=sys.stderr)
            t0 = time.monotonic()
            try:
                out = subprocess.run([sys.executable, __file__, "--case", system, workload.key,
                                      "--runs", str(args.runs)],
                                     cwd=ROOT, capture_output=True, text=True, timeout=900)
            except subprocess.TimeoutExpired:
                out = subprocess.CompletedProcess([], 1, "", "timed out after 900 s")
            took = time.monotonic() - t0
            if out.returncode != 0:
                errors[(workload.key, system)] = (out.stderr.strip().splitlines() or ["?"])[-1]
                print(f" FAILED in {took:.1f}s\n{out.stderr[-3000:]}", file=sys.stderr)
                continue
            sample = json.loads(out.stdout.strip().splitlines()[-1])
            samples.setdefault((workload.key, system), []).append(sample)
            head = sample.get(workload.headline)
            print(f" {took:.1f}s  {workload.headline}={fmt(head) if head is not None else '?'}"
                  f"  (elapsed {time.monotonic() - began:.0f}s)", file=sys.stderr, flush=True)

    if plan:
        report(args, plan, samples, errors, skipped)
    pg_ok = True
    if PG in keys:  # its own cases (a PostgreSQL server, N processes each), after the others
        from benchmarks import pg_cluster_bench

        pg_ok = pg_cluster_bench.bench(
            args.repeat, args.runs, [int(n) for n in args.pg_engines.split(",")],
            [s for s in PG_SYSTEMS if s in wanted and s not in skipped], 10.0,
            RESULTS / "pg_cluster.json")
    if errors or not pg_ok:
        print(f"\n{len(errors) + (not pg_ok)} case(s) FAILED: "
              + ", ".join([*(f"{k}/{s}" for k, s in errors), *([] if pg_ok else ["PG"])]),
              file=sys.stderr)
        raise SystemExit(1)


def report(args: argparse.Namespace, plan: list[tuple[Workload, str]],
           samples: dict[tuple[str, str], list[dict[str, Any]]],
           errors: dict[tuple[str, str], str], skipped: dict[str, str]) -> None:
    """The peers' table on stdout and benchmarks/results/peers.json (or --out)."""
    results: dict[str, Any] = {}
    for workload, system in plan:
        entry = results.setdefault(workload.key, {})
        if (workload.key, system) in errors:
            entry[system] = {"error": f"FAILED: {errors[(workload.key, system)]}"}
        else:
            entry[system] = summarise(samples[(workload.key, system)])
    rat = ratios(results)
    goals = targets(results)
    meta = {"machine": f"{platform.machine()} {os.cpu_count()} cores", "date":
            time.strftime("%Y-%m-%d"), "repeat": args.repeat, "runs": args.runs,
            "versions": versions(), "skipped": skipped,
            "notes": {w.key: w.notes for w in WORKLOADS if w.notes}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "results": results,
                                          "ratios_rulebound_over_peer": rat,
                                          "targets": goals}, indent=2) + "\n")
    v = meta["versions"]
    print(f"\nrulebound ({v['rulebound']}) beside its peers - {meta['machine']}, "
          f"Python {v['python']}, SQLite {v['sqlite']}, {meta['date']}; median of "
          f"{args.repeat} fresh processes (min-max); lower is better except steps_per_s")
    print("peak RSS: median VmHWM of each case's fresh process, interpreter and imports "
          "included (W4: the restarted process)")
    print("peers: " + ", ".join(f"{k} {v[k]}" for k in VERSIONS if k in v))
    print(table(results, rat))
    if goals:
        print("\nrulebound's targets (issue 6), from this run:")
        for goal in goals:
            print(f"  {goal['target']:<48} {goal['value']:>14}   "
                  f"{'met' if goal['met'] else 'MISSED'}")
    print(f"\nJSON: {args.out}")


if __name__ == "__main__":
    main()
