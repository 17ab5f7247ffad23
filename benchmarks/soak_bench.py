"""Sustained load over HTTP on SQLite: CPU, RSS and bytes on disk of one `rulebound serve`.

Starts one `rulebound serve` on a fresh SQLite file with `benchmarks/apps/three_steps.py`
(3-step runs, each step a function sleeping 10-50 ms, fixed per run and step) and sends it
open-loop starts over HTTP from this process (aiohttp): start i is sent at t0 + i / R
whether or not earlier ones have been answered or their runs have ended.

Phase 1, sustained: R = --rate (100) runs/s for --seconds (60). Measured on the server
process:
- CPU share: (utime + stime) from /proc/PID/stat over the window of starts, divided by its
  wall time, in % of one core (user and system also apart); this client's own beside it;
- RSS (VmRSS) sampled every second: idle (--idle seconds after start-up, before any run;
  the median), under load (the median and the largest sample of the window), and for
  --after (60) seconds once every run has ended (the last sample is "after");
- once every run has ended: bytes on disk (the SQLite file + its -wal + -shm, less the same
  for the empty store measured before the first run) per run and per step, and events per
  run, from the store's own tables; every run's status is read from the store. The same
  again over every run of both phases once the server has stopped (and checkpointed its
  WAL as it closed): the WAL of a running server is a few MB that does not shrink, which
  weighs on a short window's figure;
- every start's answer: 201, 503 or an error (no answer), and runs that did not complete.

Phase 2, ceiling: R in --ceiling (100,200,300,400,600,800) runs/s, --step-seconds (15)
each, in that order on the same server. A rate is *sustained* when
  (a) every start was answered 201 (no 503, no error),
  (b) this client sent its starts on schedule (the starts went out at >= 95% of R: below
      that the figure would be this process's, and the rate is reported "client-bound"),
  (c) every run started at that rate completed within --drain (10) seconds of the last start,
  (d) the p99 of the runs' durations (the store's created_at to updated_at of the run) is at
      most --run-bound (1.0) seconds: a run's own work is 30-150 ms, so a longer run waited
      for the server.
The ceiling is the highest rate sustained before the first rate that is not (the search
stops there). Each rate also reports its server CPU share.

Peak RSS (VmHWM) of the server, read just before it is stopped, and of this client, through
benchmarks/memory.py. The machine's load average is recorded at the start and the end: the
client and the server share its cores, and so do other sessions.

    .venv/bin/python benchmarks/soak_bench.py [--seconds 60] [--after 60]
        [--ceiling 100,200,300,400,600,800] [--step-seconds 15]

The engine keeps the final state of its last 10,000 finished runs: --seconds 120 at 100
runs/s goes past that, so the RSS under load shows both its growth and its plateau.

Writes benchmarks/results/soak.json (--out NAME: benchmarks/results/NAME, to keep a run
beside another, e.g. a branch's beside main's).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any
from uuid import UUID

import aiohttp
from rulebound.adapters.stores.sqlite import EVENTS, RUNS

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import memory  # noqa: E402
from benchmarks.overload_bench import address, pct, serve  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
STEPS = 3
TICK = os.sysconf("SC_CLK_TCK")
ENDED = ("completed", "failed", "cancelled")


def cpu_split(pid: int | str = "self") -> tuple[float, float]:
    """utime and stime of a process so far, seconds, from /proc/PID/stat (fields 14, 15)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()  # after the command name
    return int(fields[11]) / TICK, int(fields[12]) / TICK


def cpu_seconds(pid: int | str = "self") -> float:
    """utime + stime of a process so far."""
    return sum(cpu_split(pid))


def disk_bytes(db: Path) -> int:
    """The store's bytes on disk: the SQLite file, its WAL and its shared-memory file."""
    return sum(p.stat().st_size for p in (db, Path(f"{db}-wal"), Path(f"{db}-shm"))
               if p.exists())


def files_of(db: Path) -> dict[str, int]:
    """The store's files and their sizes."""
    return {p.name: p.stat().st_size for p in (db, Path(f"{db}-wal"), Path(f"{db}-shm"))
            if p.exists()}


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


class Sampler:
    """The server's RSS and CPU time every second, each sample tagged with the phase."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.phase = "idle"
        self.samples: list[dict[str, Any]] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        t0 = time.monotonic()
        while True:
            self.samples.append({"t": round(time.monotonic() - t0, 1), "phase": self.phase,
                                 "rss_mib": round(memory.rss_mib(self.pid), 1),
                                 "cpu_s": round(cpu_seconds(self.pid), 2)})
            await asyncio.sleep(1.0)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def rss(self, phase: str) -> list[float]:
        return [s["rss_mib"] for s in self.samples if s["phase"] == phase]


class Store:
    """What the server left in its SQLite file, read through a connection of our own."""

    def __init__(self, db: Path) -> None:
        self.db = db

    def _rows(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        conn = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=30)
        try:
            return conn.execute(sql, args).fetchall()
        finally:
            conn.close()

    def runs(self, run_ids: list[str]) -> dict[str, tuple[str, float]]:
        """Status and duration (created_at to updated_at, seconds) of these runs."""
        found: dict[str, tuple[str, float]] = {}
        hexes = [UUID(r).hex for r in run_ids]  # the store's form of the API's run ids
        for i in range(0, len(hexes), 500):
            chunk = hexes[i:i + 500]
            for run_id, status, created, updated in self._rows(
                    f"SELECT run_id, status, created_at, updated_at FROM {RUNS} "
                    f"WHERE run_id IN ({','.join('?' * len(chunk))})", *chunk):
                took = (datetime.fromisoformat(updated)
                        - datetime.fromisoformat(created)).total_seconds()
                found[run_id] = (status, took)
        return found

    def count_runs(self) -> int:
        return int(self._rows(f"SELECT count(*) FROM {RUNS}")[0][0])

    def events(self) -> tuple[int, int]:
        """The runs' events stored and the bytes of their payloads (the `state` column)."""
        count, size = self._rows(f"SELECT count(*), sum(length(state)) FROM {EVENTS} "
                                 f"WHERE originator_id IN (SELECT run_id FROM {RUNS})")[0]
        return count, size or 0


async def drive(session: aiohttp.ClientSession, base: str, rate: float, seconds: float
                ) -> dict[str, Any]:
    """Open-loop starts at `rate` per second for `seconds`; the answers and the run ids."""
    statuses: dict[str, int] = {}
    accepted: list[str] = []
    answer_s: list[float] = []

    async def start(i: int) -> None:
        began = time.perf_counter()
        try:
            async with session.post(base + "/v1/runs", json={
                    "workflow": "three", "input": {"i": i}}) as resp:
                body = await resp.json(content_type=None)
                key = str(resp.status)
                if resp.status == 201:
                    accepted.append(body["run_id"])
                    answer_s.append(time.perf_counter() - began)
        except (TimeoutError, aiohttp.ClientError):
            key = "error"
        statuses[key] = statuses.get(key, 0) + 1

    n = int(rate * seconds)
    tasks = []
    t0 = time.perf_counter()
    for i in range(n):
        delay = t0 + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(start(i)))
    sent = time.perf_counter() - t0
    await asyncio.gather(*tasks)
    return {"starts": n, "statuses": statuses, "accepted": accepted,
            "sent_rate": round(n / max(sent, 1e-9) if n > 1 else rate, 1),
            "answer_ms": {"p50": pct(answer_s, .5), "p99": pct(answer_s, .99),
                          "max": pct(answer_s, 1.0)},
            "window_s": sent}


async def settle(store: Store, run_ids: list[str], within: float
                 ) -> tuple[dict[str, tuple[str, float]], float]:
    """Poll the store until every run has ended or `within` seconds pass."""
    began = time.monotonic()
    while True:
        found = store.runs(run_ids)
        done = sum(1 for s, _ in found.values() if s in ENDED)
        if done == len(run_ids) or time.monotonic() - began > within:
            return found, time.monotonic() - began
        await asyncio.sleep(0.5)


def outcome(found: dict[str, tuple[str, float]], run_ids: list[str]) -> dict[str, Any]:
    by_status: dict[str, int] = {}
    for status, _ in found.values():
        by_status[status] = by_status.get(status, 0) + 1
    durations = [took for status, took in found.values() if status == "completed"]
    return {"runs_by_status": by_status,
            "not_completed": len(run_ids) - by_status.get("completed", 0),
            "run_ms": {"p50": pct(durations, .5), "p99": pct(durations, .99),
                       "max": pct(durations, 1.0)}}


async def loaded(session: aiohttp.ClientSession, base: str, pid: int, store: Store,
                 rate: float, seconds: float, drain: float) -> dict[str, Any]:
    """One rate: drive it, CPU share over the window of starts, then wait for its runs."""
    (user0, sys0), client0, wall0 = cpu_split(pid), cpu_seconds(), time.monotonic()
    sent = await drive(session, base, rate, seconds)
    (user1, sys1), client1, wall1 = cpu_split(pid), cpu_seconds(), time.monotonic()
    cpu0, cpu1 = user0 + sys0, user1 + sys1
    found, waited = await settle(store, sent["accepted"], drain)
    result = {"rate": rate, "seconds": seconds,
              "server_cpu_pct": round((cpu1 - cpu0) / (wall1 - wall0) * 100, 1),
              "server_cpu_user_pct": round((user1 - user0) / (wall1 - wall0) * 100, 1),
              "server_cpu_system_pct": round((sys1 - sys0) / (wall1 - wall0) * 100, 1),
              "client_cpu_pct": round((client1 - client0) / (wall1 - wall0) * 100, 1),
              "server_cpu_ms_per_run": round((cpu1 - cpu0) / max(sent["starts"], 1) * 1e3, 2),
              "starts": sent["starts"], "sent_rate": sent["sent_rate"],
              "statuses": sent["statuses"], "answer_ms": sent["answer_ms"],
              "settled_after_s": round(waited, 1), **outcome(found, sent["accepted"])}
    result["accepted"] = len(sent["accepted"])
    return result


def sustained(step: dict[str, Any], run_bound: float) -> tuple[bool, str]:
    """Whether the server sustained a rate (the docstring's (a)-(d)), and why not."""
    if step["statuses"].get("201", 0) != step["starts"]:
        return False, f"not every start accepted: {step['statuses']}"
    if step["sent_rate"] < 0.95 * step["rate"]:
        return False, f"client-bound: starts went out at {step['sent_rate']}/s"
    if step["not_completed"]:
        return False, f"{step['not_completed']} runs not completed in time"
    p99 = step["run_ms"]["p99"]
    if p99 is None or p99 > run_bound * 1000:
        return False, f"run p99 {p99} ms over {run_bound * 1000:.0f} ms"
    return True, "sustained"


async def main(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {"load_average_start": load_average(), "cores": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        db, log = Path(tmp) / "soak.db", Path(tmp) / "serve.log"
        proc = serve(db, log)
        sampler = Sampler(proc.pid)
        try:
            base = await address(log)
            store = Store(db)
            sampler.start()
            await asyncio.sleep(args.idle)
            empty = disk_bytes(db)
            idle = sampler.rss("idle")
            connector = aiohttp.TCPConnector(limit=2000)
            timeout = aiohttp.ClientTimeout(total=60)
            async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
                sampler.phase = "load"
                print(f"phase 1: {args.rate} runs/s for {args.seconds:g} s", flush=True)
                phase1 = await loaded(session, base, proc.pid, store, args.rate,
                                      args.seconds, args.drain)
                under = sampler.rss("load")
                sampler.phase = "after"
                events, payload = store.events()
                completed = phase1["runs_by_status"].get("completed", 0)
                on_disk = disk_bytes(db)
                files = files_of(db)
                print(f"phase 1: {json.dumps(phase1)}", flush=True)
                print(f"waiting {args.after:g} s without load", flush=True)
                await asyncio.sleep(args.after)
                after = sampler.rss("after")
                phase1.update({
                    "rss_mib": {"idle_median": round(statistics.median(idle), 1),
                                "load_median": round(statistics.median(under), 1),
                                "load_max": max(under),
                                "after_last": after[-1], "after_min": min(after),
                                "after_seconds": args.after},
                    "disk": {"empty_store_bytes": empty, "bytes_at_end": on_disk,
                             "files": files, "runs": completed,
                             "bytes_per_run": round((on_disk - empty) / max(completed, 1)),
                             "bytes_per_step": round((on_disk - empty)
                                                     / max(completed * STEPS, 1)),
                             "events": events,
                             "events_per_run": round(events / max(completed, 1), 2),
                             "event_payload_bytes_mean": round(payload / max(events, 1))}})
                result["sustained"] = phase1
                ceiling: list[dict[str, Any]] = []
                best = None
                for rate in args.ceiling:
                    sampler.phase = f"ceiling {rate}"
                    print(f"phase 2: {rate} runs/s for {args.step_seconds:g} s", flush=True)
                    step = await loaded(session, base, proc.pid, store, rate,
                                        args.step_seconds, args.drain)
                    ok, why = sustained(step, args.run_bound)
                    step["sustained"], step["verdict"] = ok, why
                    step["rss_mib_max"] = max(sampler.rss(f"ceiling {rate}") or [0.0])
                    print(f"  {rate}/s: {why}; server CPU {step['server_cpu_pct']}%, "
                          f"client CPU {step['client_cpu_pct']}%, run p99 "
                          f"{step['run_ms']['p99']} ms", flush=True)
                    ceiling.append(step)
                    if not ok:
                        break
                    best = rate
                    await asyncio.sleep(2.0)  # let the WAL checkpoint and the caches settle
                result["ceiling"] = {"runs_per_s": best, "steps": ceiling,
                                     "run_bound_s": args.run_bound, "drain_s": args.drain}
        finally:
            sampler.stop()
            server = memory.peak_of(proc.pid) if proc.poll() is None else {
                "peak_rss_mib": None, "memory_how": "the server had exited"}
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        # The whole store once the server has stopped (it checkpoints its WAL as it closes):
        # every run of both phases.
        store = Store(db)
        runs = store.count_runs()
        events, payload = store.events()
        stored = disk_bytes(db)
        result["disk_after_stop"] = {
            "bytes": stored, "runs": runs, "files": files_of(db),
            "bytes_per_run": round((stored - empty) / max(runs, 1)),
            "bytes_per_step": round((stored - empty) / max(runs * STEPS, 1)),
            "events_per_run": round(events / max(runs, 1), 2),
            "event_payload_bytes_mean": round(payload / max(events, 1))}
    result.update({
        "server_peak_rss_mib": server["peak_rss_mib"],
        "client_peak_rss_mib": memory.process_peak()["peak_rss_mib"],
        "memory_how": "VmHWM of the server process before it is stopped, and of this client",
        "load_average_end": load_average(), "rss_samples": sampler.samples})
    return result


def summary(result: dict[str, Any]) -> str:
    s = result["sustained"]
    rss, disk = s["rss_mib"], s["disk"]
    lines = [
        f"load average at start {result['load_average_start']}, at end "
        f"{result['load_average_end']} ({result['cores']} cores)",
        f"sustained {s['rate']} runs/s for {s['seconds']:g} s: server CPU "
        f"{s['server_cpu_pct']}% of a core (user {s['server_cpu_user_pct']}, system "
        f"{s['server_cpu_system_pct']}; {s['server_cpu_ms_per_run']} ms per run), client "
        f"{s['client_cpu_pct']}%; starts {s['statuses']}, not completed {s['not_completed']}, "
        f"run p50/p99 {s['run_ms']['p50']}/{s['run_ms']['p99']} ms",
        f"RSS idle {rss['idle_median']} MiB, under load median {rss['load_median']} max "
        f"{rss['load_max']}, {rss['after_seconds']:g} s after {rss['after_last']} MiB",
        f"disk {disk['bytes_per_run']} B per run, {disk['bytes_per_step']} B per step, "
        f"{disk['events_per_run']} events per run ({disk['event_payload_bytes_mean']} B "
        f"payload each)",
        "after the server stopped: {bytes_per_run} B per run, {bytes_per_step} B per step, "
        "{events_per_run} events per run, over {runs} runs".format(**result["disk_after_stop"]),
        f"ceiling {result['ceiling']['runs_per_s']} runs/s: " + "; ".join(
            f"{c['rate']}/s {c['verdict']} (server CPU {c['server_cpu_pct']}%)"
            for c in result["ceiling"]["steps"]),
        f"peak RSS server {result['server_peak_rss_mib']} MiB, client "
        f"{result['client_peak_rss_mib']} MiB [{result['memory_how']}]"]
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--idle", type=float, default=5.0)
    parser.add_argument("--after", type=float, default=60.0)
    parser.add_argument("--ceiling", type=lambda s: [int(x) for x in s.split(",") if x],
                        default=[100, 200, 300, 400, 600, 800])
    parser.add_argument("--step-seconds", type=float, default=15.0)
    parser.add_argument("--drain", type=float, default=10.0)
    parser.add_argument("--run-bound", type=float, default=1.0)
    parser.add_argument("--out", default="soak.json",
                        help="file name under benchmarks/results/ (default: soak.json)")
    args = parser.parse_args()
    result = asyncio.run(main(args))
    print(summary(result))
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / args.out  # a name under results/, or a path below it (targets/soak.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
