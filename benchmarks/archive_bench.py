"""Retention at scale: archive N ended runs from a SQLite store.

Creates N runs of a one-step workflow that end at once, then runs the same pass as
`rulebound archive` (export, read back, verify with the definition, remove), and reports the
rate in runs per second and the store's size before, after, and after VACUUM (SQLite reuses
freed pages but does not give them back to the file system by itself).

    .venv/bin/python benchmarks/archive_bench.py [--runs 100000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sqlite3
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


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
    args = parser.parse_args()
    from rulebound.adapters.stores import open_store
    from rulebound.engine.archive import archive
    from rulebound.engine.storage import StoreWorker

    tmp = tempfile.mkdtemp()
    path = f"{tmp}/archive.db"
    url = f"sqlite:///{path}"
    created = asyncio.run(create(url, args.runs))
    before = size_mb(path)
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
           "store_mb_after_vacuum": vacuumed, "archive_files_mb": round(files / 2**20, 1)}
    print(json.dumps(out, indent=2))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "archive.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
