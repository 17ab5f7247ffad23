"""The `rulebound` command as a user meets it: tables on success, one clear line on a mistake."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def rulebound(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RULEBOUND_STORE", None)
    return subprocess.run([sys.executable, "-m", "adapters.cli", *args], capture_output=True,
                          text=True, timeout=120, env=env, cwd=cwd or ROOT)


@pytest.fixture(scope="module")
def demo_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    store = f"sqlite:///{tmp_path_factory.mktemp('demo') / 'demo.db'}"
    done = rulebound("demo", "--store", store, "--no-explain")
    assert done.returncode == 0, done.stderr
    assert "Summary" in done.stdout
    return store


def run_ids(store: str) -> list[str]:
    out = rulebound("runs", "--store", store, "--json").stdout
    import json

    return [json.loads(line)["run_id"] for line in out.splitlines()]


def test_runs_show_and_explain_work_on_the_demo_store(demo_store: str) -> None:
    listing = rulebound("runs", "--store", demo_store)
    assert listing.returncode == 0
    lines = listing.stdout.splitlines()
    assert lines[0].split() == ["RUN", "WORKFLOW", "STATUS", "EVENTS", "STARTED", "SECONDS"]
    widths = {len(line) for line in lines[1:] if line.strip() and not line.startswith(" ")
              and "shown of" not in line}
    assert len(widths) == 1  # aligned columns
    assert "shown of 37 runs" in listing.stdout
    run = run_ids(demo_store)[0]
    shown = rulebound("show", run, "--store", demo_store)
    assert shown.returncode == 0
    assert f"run       {run}" in shown.stdout
    explained = rulebound("explain", run, "--store", demo_store)
    assert explained.returncode == 0
    assert "Outcome:" in explained.stdout


@pytest.mark.parametrize(("args", "needle"), [
    (["show", "00000000-0000-4000-8000-000000000000"], "no run"),
    (["show", "not-a-run"], "not a run id"),
    (["explain", "12345"], "not a run id"),
    (["runs", "--store", "nosuch://x"], "no store for nosuch:// URLs"),
    (["runs", "--store", "sqlite:////no/such/folder/x.db"], "does not exist"),
    (["runs", "--store", "postgresql://me:hunter2@127.0.0.1:1/db"], "cannot open PostgreSQL"),
    (["show", "x", "--app", "missing_file.py:registry"], "no file"),
    (["show", "x", "--app", "adapters.cli:nothing_here"], "has no attribute"),
    (["show", "x", "--app", "no_such_module:registry"], "not found"),
    (["graph", "nope"], "no workflow named 'nope'"),
])
def test_user_mistakes_are_one_line_and_a_non_zero_exit(tmp_path: Path, args: list[str],
                                                        needle: str) -> None:
    if "--store" not in args:
        args = [*args, "--store", f"sqlite:///{tmp_path / 'empty.db'}"] if args[0] != "graph" \
            else args
    done = rulebound(*args, cwd=tmp_path)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert needle in done.stderr
    assert "hunter2" not in done.stderr + done.stdout


def test_verify_refuses_a_file_that_is_not_json(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{this is not json}\n")
    done = rulebound("verify", str(bad))
    assert done.returncode == 1
    assert f"{bad}:1: not JSON" in done.stderr
    assert "Traceback" not in done.stderr


def test_runs_on_an_empty_store_says_so(tmp_path: Path) -> None:
    done = rulebound("runs", "--store", f"sqlite:///{tmp_path / 'fresh.db'}")
    assert done.returncode == 0
    assert "0 shown of 0 runs" in done.stdout
