"""`rulebound archive` as an operator meets it, on SQLite and PostgreSQL: killed half-way (at
the worst moment, and at a random one), run again, every ended run ends up in exactly one
verified file and out of the store; `rulebound verify FILE --app` checks the files offline."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rulebound import Engine
from tests.cli.archive_app import registry

ROOT = Path(__file__).resolve().parents[2]
APP = str(ROOT / "tests" / "cli" / "archive_app.py") + ":registry"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def durable_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "postgres":
        return str(request.getfixturevalue("postgres_url"))
    return f"sqlite:///{tmp_path / 'runs.db'}"


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RULEBOUND_STORE", None)
    return env


def rulebound(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "rulebound", *args], capture_output=True,
                          text=True, timeout=300, env=_env(), cwd=ROOT)


async def _fill(url: str, paid: int, broken: int) -> tuple[set[str], str]:
    async with Engine(url, registry=registry) as engine:
        started = [await engine.start("pay", {"n": i}) for i in range(paid)]
        started += [await engine.start("broken", {"n": i}) for i in range(broken)]
        for run in started:
            await engine.wait(run, timeout=30)
        holding = await engine.start("hold", {})
    return {str(r) for r in started}, str(holding)


def _listed(url: str) -> set[str]:
    done = rulebound("runs", "--store", url, "--json", "--limit", "100000")
    assert done.returncode == 0, done.stderr
    return {json.loads(line)["run_id"] for line in done.stdout.splitlines()}


def _check_nothing_lost(url: str, out: Path, ended: set[str], holding: str) -> None:
    """Every ended run is in the store, or in a file (or both, between the two steps)."""
    stored = _listed(url)
    assert holding in stored
    files = {p.stem for p in out.glob("*.jsonl")} if out.exists() else set()
    assert ended <= stored | files
    assert files <= ended
    print(f"{len(files)} files, {len(stored & ended)} ended runs still stored")


def _finish(url: str, out: Path, ended: set[str], holding: str) -> str:
    done = rulebound("archive", "--ended-before", "2999-01-01", "-o", str(out), "--store", url,
                     "--app", APP)
    assert done.returncode == 0, done.stderr
    assert _listed(url) == {holding}  # the running run is never archived
    assert {p.stem for p in out.glob("*.jsonl")} == ended
    assert not list(out.glob("*.tmp"))
    return done.stderr


def test_killed_after_files_are_secured_then_resumed(durable_url: str, tmp_path: Path) -> None:
    ended, holding = asyncio.run(_fill(durable_url, paid=6, broken=2))
    out = tmp_path / "archive"
    cut = rulebound("archive", "--ended-before", "2999-01-01", "-o", str(out), "--store",
                    durable_url, "--app", APP, "--crash-after", "5")
    assert cut.returncode == 70, cut.stderr  # died with 5 files written, none removed
    assert len(list(out.glob("*.jsonl"))) == 5
    assert ended <= _listed(durable_url)
    _check_nothing_lost(durable_url, out, ended, holding)
    summary = _finish(durable_url, out, ended, holding)
    assert "archived 8 runs" in summary and "(5 found already exported)" in summary
    # offline: each file verifies against the definitions, with its head in the manifest
    name = sorted(out.glob("*.jsonl"))[0]
    checked = rulebound("verify", str(name), "--app", APP)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "OK:" in checked.stdout and "complete per its manifest" in checked.stdout


def test_killed_at_a_random_moment_then_resumed(durable_url: str, tmp_path: Path) -> None:
    seed = int(os.environ.get("RULEBOUND_KILL_SEED") or random.randrange(2**32))
    print(f"kill seed: {seed} (RULEBOUND_KILL_SEED={seed} repeats the moment)")
    rng = random.Random(seed)
    ended, holding = asyncio.run(_fill(durable_url, paid=150, broken=10))
    out = tmp_path / "archive"
    proc = subprocess.Popen([sys.executable, "-m", "rulebound", "archive", "--ended-before",
                             "2999-01-01", "-o", str(out), "--store", durable_url, "--app",
                             APP, "--batch", "10"], env=_env(), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not (out.exists() and any(out.iterdir())) and time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        time.sleep(0.005)  # until the first file appears
    time.sleep(rng.uniform(0.0, 0.2))
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    _check_nothing_lost(durable_url, out, ended, holding)
    _finish(durable_url, out, ended, holding)
    for name in rng.sample(sorted(out.glob("*.jsonl")), 3):
        assert rulebound("verify", str(name), "--app", APP).returncode == 0


def test_archive_refuses_a_bad_date_and_a_missing_store(tmp_path: Path) -> None:
    bad = rulebound("archive", "--ended-before", "last tuesday", "-o", str(tmp_path / "a"),
                    "--store", f"sqlite:///{tmp_path / 'x.db'}")
    assert bad.returncode == 1 and "--ended-before 'last tuesday'" in bad.stderr
    missing = rulebound("archive", "--ended-before", "30d", "-o", str(tmp_path / "a"),
                        "--store", f"sqlite:///{tmp_path / 'x.db'}")
    assert missing.returncode == 1 and "no store at" in missing.stderr
    assert "Traceback" not in bad.stderr + missing.stderr
