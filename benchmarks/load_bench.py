"""How long loading a run takes, by its length, with and without a snapshot (SQLite).

    .venv/bin/python benchmarks/load_bench.py [--repeat 20] [--lengths 100,10000] [--out PATH]

Builds one run per length through the real decider (a step that loops on itself, five
events per visit), stores it in a fresh SQLite file as the engine does (stamped and chained
events), then times `Engine.get(run)` on a read-only engine, which loads the run from the
store each time (a run not live nor cached: a fold of its log):

- without snapshot: snapshots off, every load folds every event;
- with snapshot: the first load writes one (a run of SNAPSHOT_EVERY events or more), the
  timed loads start from it and fold only what came after (here: nothing);
- worst case: the snapshot is SNAPSHOT_EVERY - 1 events behind the log (the most a load
  folds without writing a newer one): the run's log is stored up to that point, loaded
  once (writing the snapshot), then the rest is appended before the timed loads.

Prints the median and p90 in milliseconds per case, and the snapshot's size. The cases share
this process, so each line's peak RSS is the case's own: the high-water mark is reset when
the case's engine is opened and read when it closes (benchmarks/memory.py), beside the RSS
at that start (the histories built so far included).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from uuid import uuid4

from rulebound.adapters.stores import open_store
from rulebound.domain.simulator import Simulator
from rulebound.engine import codec
from rulebound.engine.registry import Registry
from rulebound.engine.snapshots import SNAPSHOT_EVERY
from rulebound.engine.store import Record

from rulebound import FAIL, Engine, Limits, Route, Step, Workflow, field

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import memory  # noqa: E402

LOOP = Workflow("loop", on_failure=FAIL,
                limits=Limits(max_steps=100_000, max_cost=1e9, deadline=1e9), steps=[
                    Step("work", executor="x", max_visits=10_000,
                         routes=[Route("work", when=field("work.again").is_true())])])


def history(events: int) -> list[Record]:
    """A run of about `events` events (five per visit, plus start and end)."""
    sim = Simulator(LOOP)
    sim.start({"n": events})
    visits = max(1, (events - 3) // 5)
    for i in range(visits):
        sim.start_attempt("work")
        sim.succeed("work", {"again": i < visits - 1, "i": i})
        sim.advance_time(0.001)
    run_id = uuid4()
    records, prev = [], codec.GENESIS_HASH
    for seq, event in enumerate(sim.history, start=1):
        prev, data = codec.stamp(event, uuid4(), prev)
        records.append(Record(run_id, seq, event.type, data))
    return records


def measured(url: str, run_id: str, repeat: int, snapshots: bool
             ) -> tuple[list[float], dict[str, object]]:
    """The timed loads and the case's own peak RSS."""
    with memory.Peak() as mem:
        times = asyncio.run(timed(url, run_id, repeat, snapshots))
    return times, mem.result()


async def timed(url: str, run_id: str, repeat: int, snapshots: bool) -> list[float]:
    registry = Registry(workflows=[LOOP])
    async with Engine(url, registry=registry, read_only=True) as engine:
        if not snapshots:
            engine.runs_table.snapshot_every = 0
        await engine.get(run_id)  # warm up (and, with snapshots, write one)
        times = []
        for _ in range(repeat):
            began = time.perf_counter()
            await engine.get(run_id)
            times.append((time.perf_counter() - began) * 1000)
        return times


def report(events: int, label: str, measure: tuple[list[float], dict[str, object]],
           cases: list[dict[str, Any]]) -> None:
    times, mem = measure
    p90 = statistics.quantiles(times, n=10)[-1] if len(times) > 1 else times[0]
    cases.append({"events": events, "case": label.strip(), "median_ms": statistics.median(times),
                  "p90_ms": p90, "loads": len(times), **mem})
    print(f"{events:>6} events  {label}  {statistics.median(times):8.2f} ms  ({p90:.2f})  "
          f"{memory.line(mem)}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--lengths", default="100,10000")
    parser.add_argument("--out", help="also write the cases as JSON to this path")
    args = parser.parse_args()
    print(f"snapshot every {SNAPSHOT_EVERY} events; median (p90) of {args.repeat} loads; "
          "SQLite; Engine.get on a read-only engine")
    cases: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{Path(tmp) / 'load.db'}"
        for length in (int(x) for x in args.lengths.split(",")):
            records = history(length)
            run_id = str(records[0].run_id)
            cut = len(records) - (SNAPSHOT_EVERY - 1)
            store = open_store(url)
            store.append(records)
            store.close()
            for snapshots in (False, True):
                report(len(records), "with snapshot   " if snapshots else "without snapshot",
                       measured(url, run_id, args.repeat, snapshots), cases)
            store = open_store(url)
            snap = store.read_snapshot(records[0].run_id)  # type: ignore[attr-defined]
            store.close()
            print(f"{'':>6}         snapshot: " + (f"at event {snap.version}, "
                                                   f"{len(snap.data):,} bytes" if snap
                                                   else "none (shorter than the interval)"))
            cases.append({"events": len(records), "case": "snapshot",
                          "snapshot_bytes": len(snap.data) if snap else None})
            if cut <= SNAPSHOT_EVERY:
                continue
            worst = history(length)  # a second run: snapshot at `cut`, then the rest
            store = open_store(url)
            store.append(worst[:cut])
            store.close()
            asyncio.run(timed(url, str(worst[0].run_id), 1, True))
            store = open_store(url)
            store.append(worst[cut:])
            store.close()
            report(len(worst), f"worst case ({len(worst) - cut} after)",
                   measured(url, str(worst[0].run_id), args.repeat, True), cases)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"snapshot_every": SNAPSHOT_EVERY,
                                              "repeat": args.repeat, "cases": cases},
                                             indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
