"""Retention at scale: archive N ended runs from a SQLite store.

Creates N runs of a one-step workflow that end at once, then runs the same pass as
`rulebound archive` (export, read back, verify with the definition, remove), and reports the
rate in runs per second and the store's size before, after, and after VACUUM (SQLite reuses
freed pages but does not give them back to the file system by itself). The runs are created
in a fresh process (it reports its own peak RSS); the archive pass runs in this one, its peak
RSS the high-water mark reset when the pass begins (benchmarks/memory.py).

    .venv/bin/python benchmarks/archive_bench.py [--runs 100000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import memory  # noqa: E402


def _workflow() -> Any:
    from rulebound import END, FAIL, Step, Workflow

    return Workflow("once", on_failure=FAIL, steps=[Step("s", executor="done", next=END)])


async def _done(input: Any) -> Any:
    return {"ok": True}


async def create(url: str, runs: int) -> float:
    from rulebound import Engine

    began = time.perf_counter()
    async with Engine(url, [_workflow()], {"done": _done}, keep_finished=0,
                      max_active_runs=runs + 1) as engine:
        batch = 1000
        for start in range(0, runs, batch):
            ids = await asyncio.gather(*(engine.start("once", {"i": i})
                                         for i in range(start, min(runs, start + batch))))
            await asyncio.gather(*(engine.wait(r) for r in ids))
            print(f"  created {start + len(ids)}/{runs}", file=sys.stderr, flush=True)
    return time.perf_counter() - began


def size_mb(path: str) -> float:
    total = sum(os.path.getsize(p) for p in (path, path + "-wal") if os.path.exists(p))
    return round(total / 2**20, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100_000)
    parser.add_argument("--out", default=str(RESULTS / "archive.json"),
                        help="where to write the JSON (default benchmarks/results/archive.json)")
    parser.add_argument("--create", help=argparse.SUPPRESS)  # a store URL: create, print secs
    args = parser.parse_args()
    if args.create:
        seconds = asyncio.run(create(args.create, args.runs))
        print(json.dumps({"seconds": seconds, **memory.process_peak()}))
        return
    from rulebound.adapters.stores import open_store
    from rulebound.engine.archive import archive
    from rulebound.engine.storage import StoreWorker

    tmp = tempfile.mkdtemp()
    path = f"{tmp}/archive.db"
    url = f"sqlite:///{path}"
    made = subprocess.run([sys.executable, __file__, "--create", url, "--runs",
                           str(args.runs)], stdout=subprocess.PIPE, text=True, check=True,
                          cwd=ROOT)
    create_mem = json.loads(made.stdout.strip().splitlines()[-1])
    created = create_mem["seconds"]
    before = size_mb(path)
    with memory.Peak() as pass_mem:  # the archive pass alone: high-water mark reset here
        store = open_store(url)

        async def project() -> None:
            worker = StoreWorker(store)
            worker.start()
            await worker.project()
            await worker.close(close_store=False)

        asyncio.run(project())
        wf = _workflow()
        result = archive(store, f"{tmp}/archive", ended_before=datetime.now(UTC)
                         + timedelta(minutes=1),
                         definition_for=lambda h, n: wf if h == wf.hash else None)
        store.close()
    after = size_mb(path)
    db = sqlite3.connect(path, isolation_level=None)
    try:  # VACUUM writes through the WAL: checkpoint after it to see the file's real size
        db.execute("VACUUM")
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        db.close()
    vacuumed = size_mb(path)
    files = sum(f.stat().st_size for f in Path(f"{tmp}/archive").iterdir())
    out = {"runs": args.runs, "create_seconds": round(created, 1),
           "archived": result.archived, "kept": len(result.kept),
           "archive_seconds": round(result.seconds, 1),
           "runs_per_second": round(result.rate, 1), "events": result.events,
           "store_mb_before": before, "store_mb_after": after,
           "store_mb_after_vacuum": vacuumed, "archive_files_mb": round(files / 2**20, 1),
           "create_peak_rss_mib": create_mem["peak_rss_mib"],
           "archive_pass_memory": pass_mem.result()}
    print(json.dumps(out, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
