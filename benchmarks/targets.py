"""Issue 15's targets in one table: every scale benchmark run once, each in a fresh process.

    .venv/bin/python benchmarks/targets.py [--quick] [--only NAME,...] [--peers PATH]

`make bench` runs benchmarks/run.py (W1-W4 beside the peers, which writes
benchmarks/results/peers.json) and then this script; `make bench-targets` runs this alone.
The W1, W2 and W3 rows are read from peers.json as run.py left it (in `make bench`, the same
invocation: the table names the commit and date peers.json records). Every other row comes
from one of these scripts, each started here as a fresh subprocess with the sizes the
benchmarks README uses for issue 15 (`--quick`: small sizes to try it out; the table says
which were used), writing its JSON to benchmarks/results/targets/NAME.json:

    parked    parked_bench.py --runs 100000          100,000 runs waiting for a signal, SQLite
    inflight  inflight_bench.py --runs 10000         10,000 runs in flight, executors sleep 1 s
    load      load_bench.py --lengths 100,10000      loading a 10,000-event run
    archive   archive_bench.py --runs 100000         archiving 100,000 ended runs
    soak      soak_bench.py --seconds 120 --ceiling 100,200,...,1000   HTTP on SQLite
    startup   startup_bench.py --repeat 5 --recover 15   (1,000 ended runs)

(`peers` names the rows read from peers.json, for --only.) Progress goes to stderr (each
script's own output, prefixed with its name); the table goes to stdout as markdown and to
benchmarks/results/targets.json. A script that fails, or a figure missing from its JSON,
makes its rows say so and the exit code 1; a missed target does not change the exit code.
"""

# The targets are quoted as written, with its multiplication signs.
# ruff: noqa: RUF001

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
RESULTS = BENCH / "results"
OUT_DIR = RESULTS / "targets"

TODAY_BYTES_PER_STEP = 2571  # benchmarks/README.md, "Sustained load over HTTP" (3276d75)
SOAK_RATES = "100,200,300,400,500,600,700,800,1000"

# name -> (script, full-size arguments, --quick arguments); the JSON path is appended.
SCRIPTS: dict[str, tuple[str, list[str], list[str]]] = {
    "parked": ("parked_bench.py", ["--runs", "100000"], ["--runs", "2000"]),
    "inflight": ("inflight_bench.py", ["--runs", "10000"], ["--runs", "1000"]),
    "load": ("load_bench.py", ["--repeat", "20", "--lengths", "100,10000"],
             ["--repeat", "5", "--lengths", "100,10000"]),
    "archive": ("archive_bench.py", ["--runs", "100000"], ["--runs", "2000"]),
    "soak": ("soak_bench.py", ["--seconds", "120", "--ceiling", SOAK_RATES],
             ["--seconds", "20", "--after", "20", "--ceiling", "100,200,400",
              "--step-seconds", "5"]),
    "startup": ("startup_bench.py", ["--repeat", "5", "--ended", "1000", "--recover", "15"],
                ["--repeat", "2", "--ended", "1000", "--recover", "3"]),
}
NAMES = ["peers", *SCRIPTS]


def log(message: str) -> None:
    print(f"[targets {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def out_args(name: str, path: Path) -> list[str]:
    if name == "soak":  # soak_bench.py takes a name under benchmarks/results
        return ["--out", str(path.relative_to(RESULTS))]
    return ["--out", str(path)]


def run_script(name: str, quick: bool) -> dict[str, Any]:
    """Run one script in a fresh process; its JSON, or an error."""
    script, full, small = SCRIPTS[name]
    path = OUT_DIR / f"{name}.json"
    path.unlink(missing_ok=True)
    argv = [sys.executable, str(BENCH / script), *(small if quick else full), *out_args(name, path)]
    shown = " ".join(["benchmarks/" + script, *(small if quick else full)])
    log(f"{name}: {shown}")
    began = time.monotonic()
    tail: list[str] = []
    with subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, bufsize=1) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            if len(line) > 300:  # a JSON dump on one line: keep progress readable
                line = line[:300] + " ..."
            print(f"  {name}| {line}", file=sys.stderr, flush=True)
            tail = [*tail[-19:], line]
        code = proc.wait()
    seconds = time.monotonic() - began
    log(f"{name}: exit {code} after {seconds:.0f} s")
    run: dict[str, Any] = {"command": shown, "seconds": round(seconds, 1), "exit": code}
    if code != 0:
        return {**run, "error": f"exit code {code}: " + " / ".join(tail[-3:])}
    try:
        run["result"] = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return {**run, "error": f"no JSON at {path.relative_to(ROOT)}: {exc}"}
    return run


def read_peers(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return {"command": "make bench (benchmarks/run.py)", "error": f"no {path}: {exc}"}
    meta = data.get("meta", {})
    measured_at = str(meta.get("versions", {}).get("rulebound"))
    head = git("rev-parse", "--short", "HEAD")
    if not (head.startswith(measured_at) or measured_at.startswith(head)):
        measured_at += f", not this commit ({head})"
    written = datetime.fromtimestamp(path.stat().st_mtime, UTC).strftime("%Y-%m-%d %H:%M UTC")
    return {"command": f"benchmarks/run.py --repeat {meta.get('repeat')} --runs "
                       f"{meta.get('runs')} (rulebound {measured_at}, written {written})",
            "result": data}


# A row: the target, the figure measured, peak RSS, verdict, script.
Row = dict[str, Any]


def row(target: str, script: str, figure: Callable[[], tuple[str, str, str]]) -> Row:
    """figure() -> (measured, peak RSS, verdict); a missing key becomes an honest failure."""
    try:
        measured, peak, verdict = figure()
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
        measured, peak, verdict = f"not measured: {type(exc).__name__} {exc}", "", "FAILED"
    return {"target": target, "measured": measured, "peak_rss": peak, "verdict": verdict,
            "script": script}


def failed_rows(targets: list[str], script: str, error: str) -> list[Row]:
    return [{"target": t, "measured": f"not measured: {error}", "peak_rss": "",
             "verdict": "FAILED", "script": script} for t in targets]


def verdict(ok: bool) -> str:
    return "met" if ok else "missed"


def mib(x: float) -> str:
    return f"{x:.1f} MiB"


def n(x: float, digits: int = 1) -> str:
    return f"{x:,.{digits}f}"


# --- rows per source -------------------------------------------------------------------------

PEER_TARGETS = [
    "W1 per step in memory ≤ 0.5× Apache Burr's in the same run",
    "W2 per step on SQLite ≤ 0.5× Burr's",
    "W2 per step on SQLite within 1.5× one raw durable SQLite commit on the same disk",
    "200 concurrent runs in memory ≤ 1.5× the ideal wall time",
    "200 concurrent runs on SQLite ≤ 2× the ideal wall time",
]


def peers_rows(run: dict[str, Any]) -> list[Row]:
    script = "benchmarks/run.py (results/peers.json)"
    if "error" in run:
        return failed_rows(PEER_TARGETS, script, run["error"])
    res = run["result"]["results"]

    def med(workload: str, system: str, key: str) -> float:
        return float(res[workload][system][key]["median"])

    def w1() -> tuple[str, str, str]:
        rb, burr = med("W1", "rulebound", "us_per_step"), med("W1", "burr", "us_per_step")
        return (f"{rb / burr:.2f}× ({n(rb)} µs vs Burr {n(burr)} µs per step, medians)",
                f"{mib(med('W1', 'rulebound', 'peak_rss_mib'))} / Burr "
                f"{mib(med('W1', 'burr', 'peak_rss_mib'))}", verdict(rb / burr <= 0.5))

    def w2_burr() -> tuple[str, str, str]:
        rb, burr = med("W2", "rulebound", "us_per_step"), med("W2", "burr", "us_per_step")
        return (f"{rb / burr:.2f}× ({n(rb, 0)} µs vs Burr {n(burr, 0)} µs per step)",
                f"{mib(med('W2', 'rulebound', 'peak_rss_mib'))} / Burr "
                f"{mib(med('W2', 'burr', 'peak_rss_mib'))}", verdict(rb / burr <= 0.5))

    def w2_floor() -> tuple[str, str, str]:
        rb, floor = med("W2", "rulebound", "us_per_step"), med("W2", "floor", "us_per_step")
        return (f"{rb / floor:.2f}× ({n(rb, 0)} µs vs one fsync'd commit {n(floor, 0)} µs)",
                f"{mib(med('W2', 'rulebound', 'peak_rss_mib'))} / floor "
                f"{mib(med('W2', 'floor', 'peak_rss_mib'))}", verdict(rb / floor <= 1.5))

    def w3(workload: str, bound: float) -> Callable[[], tuple[str, str, str]]:
        def figure() -> tuple[str, str, str]:
            ratio = med(workload, "rulebound", "ratio_to_ideal")
            wall = med(workload, "rulebound", "wall_ms")
            return (f"{ratio:.2f}× ({n(wall, 0)} ms against the 50 ms ideal)",
                    mib(med(workload, "rulebound", "peak_rss_mib")), verdict(ratio <= bound))
        return figure

    return [row(PEER_TARGETS[0], script, w1), row(PEER_TARGETS[1], script, w2_burr),
            row(PEER_TARGETS[2], script, w2_floor), row(PEER_TARGETS[3], script, w3("W3m", 1.5)),
            row(PEER_TARGETS[4], script, w3("W3s", 2.0))]


PARKED_TARGETS = [
    "100,000 runs waiting for a signal on SQLite: engine RSS ≤ 200 MB above an empty engine",
    "100,000 runs waiting for a signal on SQLite: open() < 1 s",
    "100,000 runs waiting for a signal on SQLite: a signal completes its run within 50 ms p99",
]


def parked_rows(run: dict[str, Any]) -> list[Row]:
    script = "benchmarks/parked_bench.py"
    if "error" in run:
        return failed_rows(PARKED_TARGETS, script, run["error"])
    r = run["result"]
    size = f" [{r['runs']:,} runs]" if r["runs"] != 100_000 else ""
    peak = f"measuring process {mib(r['measure_peak_rss_mib'])}"
    return [
        row(PARKED_TARGETS[0], script, lambda: (
            f"{r['rss_above_empty_mb']} MB ({r['rss_open_mb']} vs {r['rss_empty_mb']} MB); "
            f"store {r['store_mb']} MB{size}",
            f"{peak}; creating process {mib(r['create_peak_rss_mib'])}",
            verdict(r["rss_above_empty_mb"] <= 200))),
        row(PARKED_TARGETS[1], script, lambda: (
            f"{r['open_seconds']:.3f} s{size}", peak, verdict(r["open_seconds"] < 1))),
        row(PARKED_TARGETS[2], script, lambda: (
            f"p99 {r['signal_to_end_ms_p99']:.2f} ms (p50 {r['signal_to_end_ms_p50']:.2f})"
            f"{size}", peak, verdict(r["signal_to_end_ms_p99"] <= 50))),
    ]


INFLIGHT_TARGETS = [
    "10,000 runs in flight (executors sleep 1 s): loop lag p99 ≤ 20 ms, memory",
    "10,000 runs in flight (executors sleep 1 s): loop lag p99 ≤ 20 ms, SQLite",
    "10,000 runs in flight: memory per in-flight run reported",
]


def inflight_rows(run: dict[str, Any]) -> list[Row]:
    script = "benchmarks/inflight_bench.py"
    if "error" in run:
        return failed_rows(INFLIGHT_TARGETS, script, run["error"])
    r = run["result"]

    def lag(store: str) -> Callable[[], tuple[str, str, str]]:
        def figure() -> tuple[str, str, str]:
            c = r[store]
            lagged = c["loop_lag_ms_while_in_flight"]
            gcs = c["full_gc_ms_while_in_flight"]
            size = f" [{c['runs']:,} runs]" if c["runs"] != 10_000 else ""
            return (f"p99 {lagged['p99']:.1f} ms (max {lagged['max']:.1f}; {gcs['n']} full "
                    f"collections in flight, longest {gcs['max']:.0f} ms; "
                    f"{c['in_flight_at_peak']:,} in flight at peak){size}", mib(c["peak_rss_mib"]),
                    verdict(lagged["p99"] <= 20))
        return figure

    def per_run() -> tuple[str, str, str]:
        m, s = r["memory"], r["sqlite"]
        return (f"memory {m['kb_per_run_in_flight']:.1f} KB, SQLite "
                f"{s['kb_per_run_in_flight']:.1f} KB per run in flight",
                f"{mib(m['peak_rss_mib'])} / {mib(s['peak_rss_mib'])}", "reported")

    return [row(INFLIGHT_TARGETS[0], script, lag("memory")),
            row(INFLIGHT_TARGETS[1], script, lag("sqlite")),
            row(INFLIGHT_TARGETS[2], script, per_run)]


LOAD_TARGETS = ["loading a 10,000-event run < 20 ms with a snapshot"]


def load_rows(run: dict[str, Any]) -> list[Row]:
    script = "benchmarks/load_bench.py"
    if "error" in run:
        return failed_rows(LOAD_TARGETS, script, run["error"])
    cases = run["result"]["cases"]

    def figure() -> tuple[str, str, str]:
        big = max(c["events"] for c in cases)
        of = {c["case"].split(" (")[0]: c for c in cases if c["events"] == big}
        snap, worst, none = of["with snapshot"], of.get("worst case"), of["without snapshot"]
        text = (f"{snap['median_ms']:.2f} ms median (p90 {snap['p90_ms']:.2f}) for "
                f"{big:,} events; worst case (199 events after the snapshot) "
                + (f"{worst['median_ms']:.2f} ms" if worst else "—")
                + f"; without a snapshot {none['median_ms']:.0f} ms")
        return (text, f"{mib(snap['peak_rss_mib'])} (+{snap['peak_above_start_mib']})",
                verdict(snap["median_ms"] < 20 and (worst is None or worst["median_ms"] < 20)))

    return [row(LOAD_TARGETS[0], script, figure)]


ARCHIVE_TARGETS = ["archive of 100,000 ended runs: rate in runs/s, store size before and after"]


def archive_rows(run: dict[str, Any]) -> list[Row]:
    script = "benchmarks/archive_bench.py"
    if "error" in run:
        return failed_rows(ARCHIVE_TARGETS, script, run["error"])
    r = run["result"]

    def figure() -> tuple[str, str, str]:
        pm = r["archive_pass_memory"]
        ok = r["archived"] == r["runs"] and r["kept"] == 0
        return (f"{r['runs_per_second']:,.0f} runs/s ({r['archived']:,} runs in "
                f"{r['archive_seconds']} s); store {r['store_mb_before']} MB before, "
                f"{r['store_mb_after']} MB after, {r['store_mb_after_vacuum']} MB after VACUUM",
                f"archive pass {mib(pm['peak_rss_mib'])} (+{pm['peak_above_start_mib']}); "
                f"creating process {mib(r['create_peak_rss_mib'])}",
                "reported" if ok else f"FAILED: {r['kept']} kept back")

    return [row(ARCHIVE_TARGETS[0], script, figure)]


SOAK_TARGETS = [
    "sustained load over HTTP on SQLite, 3-step runs: 100 runs/s at ≤ 25% of a core",
    "sustained load over HTTP on SQLite: ceiling ≥ 400 runs/s",
    "sustained load over HTTP on SQLite: RSS flat under load",
    "sustained load over HTTP on SQLite: RSS back within 20% of idle a minute after",
    "sustained load over HTTP on SQLite: bytes on disk per step reported and ≤ half of "
    f"today's ({TODAY_BYTES_PER_STEP:,} B; the half is {TODAY_BYTES_PER_STEP // 2:,})",
]


def soak_rows(run: dict[str, Any]) -> list[Row]:
    script = "benchmarks/soak_bench.py"
    if "error" in run:
        return failed_rows(SOAK_TARGETS, script, run["error"])
    r = run["result"]
    s = r["sustained"]
    server = f"server {mib(r['server_peak_rss_mib'])}"

    def cpu() -> tuple[str, str, str]:
        return (f"{s['server_cpu_pct']}% of a core ({s['server_cpu_ms_per_run']} ms per run) "
                f"over {s['seconds']:g} s, {s['starts']:,} starts, {s['not_completed']} not "
                f"completed, run p99 {s['run_ms']['p99']} ms",
                f"{server}; client {mib(r['client_peak_rss_mib'])}",
                verdict(s["server_cpu_pct"] <= 25 and s["not_completed"] == 0
                        and s["sent_rate"] >= 0.95 * s["rate"]))

    def ceiling() -> tuple[str, str, str]:
        c = r["ceiling"]
        steps = c["steps"]
        if not steps:
            raise ValueError("no ceiling phase")
        rate = c["runs_per_s"] or 0
        above = [st for st in steps if st["rate"] > rate]
        stop = (f"; at {above[0]['rate']}/s: {above[0]['verdict']}, "
                f"{above[0]['server_cpu_pct']}% of a core, run p99 "
                f"{above[0]['run_ms']['p99']} ms") if above else "; no higher rate tried"
        at = next((st for st in steps if st["rate"] == rate), None)
        cpu_at = f" ({at['server_cpu_pct']}% of a core)" if at else ""
        return (f"{rate} runs/s{cpu_at}{stop}",
                f"{server} (whole run)", verdict(rate >= 400))

    def thirds(values: list[float]) -> tuple[float, float]:
        third = max(1, len(values) // 3)
        return statistics.median(values[third:2 * third]), statistics.median(values[-third:])

    def flat() -> tuple[str, str, str]:
        load = [x["rss_mib"] for x in r["rss_samples"] if x["phase"] == "load"]
        middle, last = thirds(load)
        growth = last / middle - 1
        return (f"{load[0]:.1f} → {max(load):.1f} MiB over the window; median of its last "
                f"third {last:.1f} vs middle third {middle:.1f} ({growth:+.1%}; flat: within "
                "5%)", f"{server}", verdict(abs(growth) <= 0.05))

    def back() -> tuple[str, str, str]:
        rss = s["rss_mib"]
        share = rss["after_last"] / rss["idle_median"]
        return (f"{rss['after_last']} MiB {rss['after_seconds']:g} s after the last run, "
                f"{share:.0%} of idle ({rss['idle_median']} MiB; 120% is "
                f"{1.2 * rss['idle_median']:.1f})", server, verdict(share <= 1.2))

    def disk() -> tuple[str, str, str]:
        d = r["disk_after_stop"]
        per_step = d["bytes_per_step"]
        return (f"{per_step:,} B per step ({d['bytes_per_run']:,} B per run, "
                f"{d['events_per_run']} events per run, {d['runs']:,} runs, after the server "
                f"stopped); {per_step / TODAY_BYTES_PER_STEP:.0%} of today's", "",
                verdict(per_step <= TODAY_BYTES_PER_STEP // 2))

    return [row(SOAK_TARGETS[0], script, cpu), row(SOAK_TARGETS[1], script, ceiling),
            row(SOAK_TARGETS[2], script, flat), row(SOAK_TARGETS[3], script, back),
            row(SOAK_TARGETS[4], script, disk)]


STARTUP_TARGETS = [
    "start-up: `rulebound --help` < 150 ms",
    "start-up: `rulebound runs` on the demo store < 300 ms",
    "start-up: a recovered run's next step within 5 ms of open() returning with 1,000 "
    "ended runs",
]


def startup_rows(run: dict[str, Any]) -> list[Row]:
    script = "benchmarks/startup_bench.py"
    if "error" in run:
        return failed_rows(STARTUP_TARGETS, script, run["error"])
    r = run["result"]

    def command(label: str, bound: float) -> Callable[[], tuple[str, str, str]]:
        def figure() -> tuple[str, str, str]:
            c = r["commands"][label]
            return (f"{c['median_ms']:.0f} ms median (min {c['min_ms']:.0f}, max "
                    f"{c['max_ms']:.0f})", mib(c["peak_rss_mib"]),
                    verdict(c["median_ms"] < bound))
        return figure

    def recovered() -> tuple[str, str, str]:
        rec = r["recovery"]
        after, total = rec["step_after_open_returned_ms"], rec["step_after_open_called_ms"]
        return (f"{after['median']:+.2f} ms median, {after['p95']:+.2f} ms p95 after open() "
                f"returned (open() itself {rec['open_ms']['median']:.1f} ms median; "
                f"{total['median']:.1f} ms from open() called; {rec['ended_runs']:,} ended "
                f"runs, {rec['processes']} processes)",
                f"{mib(rec['peak_rss_mib']['median'])} median per process",
                verdict(after["p95"] <= 5))

    return [row(STARTUP_TARGETS[0], script, command("rulebound --help", 150)),
            row(STARTUP_TARGETS[1], script, command("rulebound runs (demo store)", 300)),
            row(STARTUP_TARGETS[2], script, recovered)]


ROWS: dict[str, Callable[[dict[str, Any]], list[Row]]] = {
    "peers": peers_rows, "parked": parked_rows, "inflight": inflight_rows, "load": load_rows,
    "archive": archive_rows, "soak": soak_rows, "startup": startup_rows,
}


def git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def markdown(report: dict[str, Any]) -> str:
    lines = [f"Issue 15's targets: `benchmarks/targets.py{' --quick' if report['quick'] else ''}`"
             f" at {report['commit']}, {report['date']}, load average "
             f"{report['load_average_start'][0]:.1f} at the start and "
             f"{report['load_average_end'][0]:.1f} at the end, {report['wall_seconds']:.0f} s."
             + (" **Quick sizes, not the issue's.**" if report["quick"] else ""), "",
             "| target (issue 15) | measured | peak RSS | met? | script |", "|---|---|---|---|---|"]
    for r in report["rows"]:
        cells = [r["target"], r["measured"], r["peak_rss"] or "—", r["verdict"], r["script"]]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    lines.append("")
    lines.append("Commands (in this order):")
    for name, run in report["runs"].items():
        lines.append(f"- {name}: `{run['command']}` ({run.get('seconds', 0):.0f} s"
                     + (f"; FAILED: {run['error']}" if "error" in run else "") + ")")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="small sizes, to try it out (the table says which)")
    parser.add_argument("--only", default=",".join(NAMES),
                        help=f"comma-separated, of {','.join(NAMES)} (default: all)")
    parser.add_argument("--peers", default=str(RESULTS / "peers.json"),
                        help="run.py's JSON for the W1-W3 rows (default results/peers.json)")
    parser.add_argument("--out", default=str(RESULTS / "targets.json"))
    args = parser.parse_args()
    only = [x for x in args.only.split(",") if x]
    unknown = set(only) - set(NAMES)
    if unknown:
        parser.error(f"unknown: {', '.join(sorted(unknown))}; choose from {', '.join(NAMES)}")
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    # Results files do not count: in `make bench`, run.py has just rewritten peers.json.
    dirty = bool(git("status", "--porcelain", "--untracked-files=no", "--", ".",
                     ":(exclude)benchmarks/results"))
    report: dict[str, Any] = {
        "commit": git("rev-parse", "--short", "HEAD") + (" (uncommitted changes)" if dirty
                                                         else ""),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "quick": args.quick,
        "python": sys.version.split()[0], "cores": os.cpu_count(),
        "load_average_start": list(os.getloadavg()), "runs": {}, "rows": []}
    began = time.monotonic()
    for name in [x for x in NAMES if x in only]:
        run = read_peers(Path(args.peers)) if name == "peers" else run_script(name, args.quick)
        if "error" in run:
            log(f"{name}: FAILED: {run['error']}")
        report["runs"][name] = run
        report["rows"].extend(ROWS[name](run))
    report["wall_seconds"] = round(time.monotonic() - began, 1)
    report["load_average_end"] = list(os.getloadavg())
    failed = [r["target"] for r in report["rows"] if r["verdict"].startswith("FAILED")]
    table = markdown(report)
    print(table)
    runs_meta = {k: {kk: vv for kk, vv in v.items() if kk != "result"}
                 for k, v in report["runs"].items()}
    Path(args.out).write_text(json.dumps({**report, "runs": runs_meta, "markdown": table},
                                         indent=2, ensure_ascii=False) + "\n")
    log(f"wrote {args.out} and {OUT_DIR}/*.json; {len(failed)} rows failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
