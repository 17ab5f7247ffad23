"""Overload: how fast `rulebound serve` says no when asked for more than it can do.

Open-loop starts over HTTP (default 300 runs/s for 10 s, 3-step runs of 10-50 ms function
steps, SQLite) against one `rulebound serve`, with `/metrics` scraped every second. Reports
how long the answers took (201 accepted, 503 overloaded) at p50/p99/max, the scrape times,
whether every accepted run completed, and the peak RSS of the server process (VmHWM, read
just before it is stopped) and of this client process. The issue's figures before
this work: 503s took about 21 s to arrive and a scrape 1.7 s at 300 starts/s.

    .venv/bin/python benchmarks/overload_bench.py [--rate 300] [--seconds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import memory  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, int(p * len(values)))] * 1000, 1)


APP = f"{ROOT / 'benchmarks/apps/three_steps.py'}:registry"


def serve(db: Path, log: Path, max_active: int = 1000) -> subprocess.Popen[bytes]:
    """`rulebound serve` on the SQLite file `db` with the 3-step app, output to `log`."""
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "rulebound", "serve", "--store", f"sqlite:///{db}",
             "--app", APP, "--port", "0", "--max-active-runs", str(max_active)],
            stdout=out, stderr=out, cwd=ROOT)


def _printed(log: Path) -> str:
    return log.read_text()


async def address(log: Path) -> str:
    """The server's base URL, once it has printed it (30 s at most)."""
    for _ in range(600):
        found = re.search(r"on (http://127\.0\.0\.1:\d+) ", _printed(log))
        if found:
            return found.group(1)
        await asyncio.sleep(0.05)
    raise RuntimeError(f"the server did not say where it listens:\n{_printed(log)}")


async def main(rate: int, seconds: float, max_active: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "serve.log"
        proc = serve(Path(tmp) / "o.db", log, max_active)
        try:
            base = await address(log)
            answers: dict[int, list[float]] = {}
            accepted: list[str] = []
            scrapes: list[float] = []
            connector = aiohttp.TCPConnector(limit=2000)
            async with aiohttp.ClientSession(connector=connector) as session:
                async def start(i: int) -> None:
                    began = time.perf_counter()
                    try:
                        async with session.post(base + "/v1/runs", json={
                                "workflow": "three", "input": {"i": i}}) as resp:
                            body = await resp.json(content_type=None)
                            answers.setdefault(resp.status, []).append(
                                time.perf_counter() - began)
                            if resp.status == 201:
                                accepted.append(body["run_id"])
                    except aiohttp.ClientError:
                        answers.setdefault(0, []).append(time.perf_counter() - began)

                async def scrape() -> None:
                    while True:
                        began = time.perf_counter()
                        async with session.get(base + "/metrics") as resp:
                            await resp.read()
                        scrapes.append(time.perf_counter() - began)
                        await asyncio.sleep(1.0)

                scraping = asyncio.create_task(scrape())
                tasks = []
                t0 = time.perf_counter()
                for i in range(int(rate * seconds)):
                    delay = t0 + i / rate - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    tasks.append(asyncio.create_task(start(i)))
                await asyncio.gather(*tasks)
                scraping.cancel()
                ended: dict[str, int] = {}
                deadline = time.monotonic() + 120
                for run_id in accepted:
                    while time.monotonic() < deadline:
                        async with session.get(f"{base}/v1/runs/{run_id}") as resp:
                            status = (await resp.json())["status"]
                        if status in ("completed", "failed", "cancelled"):
                            ended[status] = ended.get(status, 0) + 1
                            break
                        await asyncio.sleep(0.05)
                took = time.perf_counter() - t0
        finally:
            server = memory.peak_of(proc.pid)
            proc.terminate()
            proc.wait(30)
    return {
        "server_peak_rss_mib": server["peak_rss_mib"],
        "client_peak_rss_mib": memory.process_peak()["peak_rss_mib"],
        "memory_how": "VmHWM of the server process before it is stopped, and of this client",
        "rate": rate, "seconds": seconds, "max_active_runs": max_active,
        "accepted": len(answers.get(201, [])), "overloaded": len(answers.get(503, [])),
        "errors": len(answers.get(0, [])), "accepted_runs_ended": ended,
        "seconds_until_all_ended": round(took, 1),
        "accepted_ms": {"p50": pct(answers.get(201, []), .5),
                        "p99": pct(answers.get(201, []), .99)},
        "overloaded_ms": {"p50": pct(answers.get(503, []), .5),
                          "p99": pct(answers.get(503, []), .99),
                          "max": pct(answers.get(503, []), 1.0)},
        "metrics_scrape_ms": {"p50": pct(scrapes, .5), "max": pct(scrapes, 1.0),
                              "n": len(scrapes)},
        "other_statuses": {str(k): len(v) for k, v in answers.items()
                           if k not in (0, 201, 503)},
        "mean_answer_ms": round(statistics.mean(
            [x for v in answers.values() for x in v]) * 1000, 1),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=int, default=300)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--max-active-runs", type=int, default=1000)
    args = parser.parse_args()
    result = asyncio.run(main(args.rate, args.seconds, args.max_active_runs))
    print(json.dumps(result, indent=2))
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "overload.json"  # one entry per case, so runs of other cases stay
    cases = json.loads(path.read_text()) if path.exists() else {}
    if "rate" in cases:  # the older layout: one case at the top level
        cases = {}
    cases[f"rate {args.rate}/s for {args.seconds:g} s, max_active_runs "
          f"{args.max_active_runs}"] = result
    path.write_text(json.dumps(cases, indent=2) + "\n")
