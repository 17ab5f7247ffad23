"""`rulebound serve` as a deployment meets it: bind first, print the real address, drain on
SIGTERM as on Ctrl-C, fail at once on a busy port."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from rulebound.engine import Engine

ROOT = Path(__file__).resolve().parents[2]
APP = f"{Path(__file__).with_name('slow_app.py')}:registry"


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SLOW_SECONDS": "1.5"}
    env.pop("RULEBOUND_STORE", None)
    env.pop("RULEBOUND_TOKEN", None)
    return env


def _http(method: str, url: str, body: Any = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as resp:
        return resp.status, json.loads(resp.read())


def _serve(store: str, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "rulebound", "serve", "--app", APP, "--store", store,
         "--port", "0", *extra], stderr=subprocess.PIPE, text=True, env=_env(), cwd=ROOT)


def _address(proc: subprocess.Popen[str]) -> str:
    assert proc.stderr is not None
    line = proc.stderr.readline()
    found = re.search(r"on (http://127\.0\.0\.1:(\d+)) ", line)
    assert found, line
    assert found.group(2) != "0"  # the real port, not the one asked for
    return found.group(1)


def _stop(proc: subprocess.Popen[str]) -> str:
    """SIGTERM the server; it exits 0; returns what it printed on stderr since."""
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    return proc.stderr.read() if proc.stderr else ""


def _kill(proc: subprocess.Popen[str]) -> None:
    """Whatever a test left running (it failed before stopping the server)."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_sigterm_drains_an_attempt_in_flight_and_exits_0(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path / 'serve.db'}"
    proc = _serve(store)
    try:
        base = _address(proc)
        status, started = _http("POST", f"{base}/v1/runs", {"workflow": "slow", "input": 7})
        assert status == 201
        run_id = started["run_id"]
        for _ in range(200):  # until the attempt is in flight
            _, events = _http("GET", f"{base}/v1/runs/{run_id}/events")
            if any(e["type"] == "AttemptStarted" for e in events):
                break
            time.sleep(0.02)
        else:
            raise AssertionError("the attempt never started")
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        took = time.monotonic() - sent
        err = proc.stderr.read() if proc.stderr else ""
    finally:
        _kill(proc)
    assert "Traceback" not in err, err
    assert "SIGTERM" in err
    assert took < 10, took  # the attempt (1.5 s) finished; no waiting out the drain timeout

    async def stored() -> Any:
        async with Engine(store, read_only=True) as engine:
            return await engine.events(run_id)

    events = asyncio.run(stored())
    kinds = [e.type for e in events]
    assert "AttemptSucceeded" in kinds, kinds  # finished during the drain, not lost
    assert "AttemptAbandoned" not in kinds


def test_a_busy_port_fails_at_once_before_touching_the_store(tmp_path: Path) -> None:
    db = tmp_path / "busy.db"
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        started = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "rulebound", "serve", "--app", APP, "--store",
             f"sqlite:///{db}", "--port", str(port)],
            capture_output=True, text=True, timeout=60, env=_env(), cwd=ROOT)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in lines[0]
    assert "in use" in lines[0]
    assert "serving" not in done.stderr
    assert not db.exists()  # nothing recovered, no store opened
    assert time.monotonic() - started < 30


def _get(url: str) -> tuple[int, Any, Any]:
    """A GET that returns 4xx and 5xx answers instead of raising."""
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, json.loads(resp.read()), resp.headers
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read()), exc.headers


def test_serve_is_live_at_once_and_prints_serving_when_ready(tmp_path: Path) -> None:
    """The engine's open() is held (the --app's executor waits for a file in its `open`):
    meanwhile /healthz answers, /readyz and the run API say 503 not ready, and the
    `serving` line is not printed yet; once the file appears, it is, and /readyz says 200."""
    gate = tmp_path / "gate"
    with socket.socket() as probe:  # a free port: the address is printed only when ready
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "rulebound", "serve", "--app",
         f"{Path(__file__).with_name('gated_app.py')}:registry", "--store",
         f"sqlite:///{tmp_path / 'gated.db'}", "--port", str(port)],
        stderr=subprocess.PIPE, text=True, env={**_env(), "GATE_FILE": str(gate)}, cwd=ROOT)
    try:
        for _ in range(600):  # until it listens
            try:
                status, health, _ = _get(f"{base}/healthz")
                break
            except OSError:
                assert proc.poll() is None
                time.sleep(0.05)
        else:
            raise AssertionError("serve never answered /healthz")
        assert status == 200 and health["status"] == "ok"
        status, body, headers = _get(f"{base}/readyz")
        assert status == 503 and body["ready"] is False and "recovering runs" in body["reason"]
        assert int(headers["Retry-After"]) >= 1
        status, body, headers = _get(f"{base}/v1/runs")
        assert (status, body["error"]["type"]) == (503, "not_ready")
        assert int(headers["Retry-After"]) >= 1

        gate.touch()
        assert _address(proc) == base  # the first line on stderr: serving, now ready
        status, body, _ = _get(f"{base}/readyz")
        assert (status, body) == (200, {"ready": True, "reason": None})
        status, _ = _http("POST", f"{base}/v1/runs", {"workflow": "gated", "input": 1})
        assert status == 201
        _stop(proc)
    finally:
        _kill(proc)


def test_a_stop_while_not_ready_exits_0_at_once(tmp_path: Path) -> None:
    """SIGTERM during a long open (recovery) stops it: the next start recovers instead."""
    gate = tmp_path / "never"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "rulebound", "serve", "--app",
         f"{Path(__file__).with_name('gated_app.py')}:registry", "--store",
         f"sqlite:///{tmp_path / 'gated.db'}", "--port", str(port)],
        stderr=subprocess.PIPE, text=True, env={**_env(), "GATE_FILE": str(gate)}, cwd=ROOT)
    try:
        for _ in range(600):
            try:
                assert _get(f"http://127.0.0.1:{port}/readyz")[0] == 503
                break
            except OSError:
                assert proc.poll() is None
                time.sleep(0.05)
        err = _stop(proc)
    finally:
        _kill(proc)
    assert "Traceback" not in err, err
    assert "serving" not in err and "SIGTERM" in err and "stopped" in err


def test_serve_archives_old_ended_runs_on_a_schedule(tmp_path: Path) -> None:
    from tests.cli.aged_runs import fill as _fill

    db = tmp_path / "kept.db"
    old, going, recent = asyncio.run(_fill(f"sqlite:///{db}"))
    out = tmp_path / "archive"
    proc = subprocess.Popen(
        [sys.executable, "-m", "rulebound", "serve", "--app",
         str(ROOT / "tests" / "cli" / "archive_app.py") + ":registry", "--store",
         f"sqlite:///{db}", "--port", "0", "--retain-for", "30", "--archive-dir", str(out),
         "--archive-every", "1s"], stderr=subprocess.PIPE, text=True, env=_env(), cwd=ROOT)
    try:
        base = _address(proc)
        for _ in range(600):
            _, listed = _http("GET", f"{base}/v1/runs?limit=100")
            stored = {row["run_id"] for row in listed["runs"]}
            if not stored & old:
                break
            time.sleep(0.05)
        assert stored == {going, *recent}
        for _ in range(600):  # the pass counts its runs once it has ended
            with urllib.request.urlopen(f"{base}/metrics", timeout=10) as resp:
                metrics = resp.read().decode()
            if f"rulebound_archived_runs_total {len(old)}" in metrics:
                break
            time.sleep(0.05)
        assert f"rulebound_archived_runs_total {len(old)}" in metrics
        err = _stop(proc)
    finally:
        _kill(proc)
    assert "Traceback" not in err, err
    assert f"rulebound: retention: archived {len(old)} runs" in err, err
    assert {p.stem for p in out.glob("*.jsonl")} == old


def test_serve_refuses_retention_flags_that_cannot_work(tmp_path: Path) -> None:
    db = tmp_path / "never.db"
    for flags, message in (
            (["--retain-for", "30"], "needs both --retain-for AGE and --archive-dir DIR"),
            (["--retain-for", "-3", "--archive-dir", str(tmp_path / "a")],
             "--retain-for '-3': expected an age"),
            (["--retain-for", "30d", "--archive-dir", str(tmp_path / "a"),
              "--archive-every", "0s"], "every must be positive"),
            (["--retain-for", "30d", "--archive-dir", str(tmp_path / "no" / "a")],
             "no directory")):
        done = subprocess.run(
            [sys.executable, "-m", "rulebound", "serve", "--app", APP, "--store",
             f"sqlite:///{db}", "--port", "0", *flags],
            capture_output=True, text=True, timeout=60, env=_env(), cwd=ROOT)
        assert done.returncode == 1, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (flags, done.stderr)
        assert not db.exists()  # refused before anything was opened


def _metric(base: str, name: str) -> str | None:
    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as resp:
        found = re.search(rf"^{name} (\S+)$", resp.read().decode(), re.M)
    return found.group(1) if found else None


def test_serve_gives_memory_back_when_quiet_and_not_with_0(tmp_path: Path) -> None:
    for flag, expected in (("0.3", "1"), ("0", None)):
        proc = _serve(f"sqlite:///{tmp_path / f'give{flag}.db'}", "--give-back-after", flag)
        try:
            base = _address(proc)
            for _ in range(200):
                seen = _metric(base, "rulebound_memory_give_backs_total")
                if seen == expected:
                    break
                time.sleep(0.05)
            time.sleep(1.0)  # no second one while it stays quiet
            assert _metric(base, "rulebound_memory_give_backs_total") == expected
            err = _stop(proc)
        finally:
            _kill(proc)
        assert "Traceback" not in err, err


def test_serve_refuses_a_give_back_period_that_is_not_seconds(tmp_path: Path) -> None:
    db = tmp_path / "never.db"
    for raw in ("-1", "soon", "nan", "inf"):
        done = subprocess.run(
            [sys.executable, "-m", "rulebound", "serve", "--app", APP, "--store",
             f"sqlite:///{db}", "--port", "0", f"--give-back-after={raw}"],
            capture_output=True, text=True, timeout=60, env=_env(), cwd=ROOT)
        assert done.returncode == 1, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and f"--give-back-after {raw!r}: expected a number of " \
            "seconds" in lines[0], (raw, done.stderr)
        assert not db.exists()  # refused before anything was opened
