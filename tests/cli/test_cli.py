"""The `rulebound` command as a user meets it: tables on success, one clear line on a mistake."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from rulebound.adapters.stores import open_store

ROOT = Path(__file__).resolve().parents[2]


def rulebound(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RULEBOUND_STORE", None)
    return subprocess.run([sys.executable, "-m", "rulebound", *args], capture_output=True,
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
    (["runs", "--store", "postgresql://me:hunter2@127.0.0.1:1/db"], "cannot reach PostgreSQL"),
    (["show", "x", "--app", "missing_file.py:registry"], "no file"),
    (["show", "x", "--app", "rulebound.adapters.cli:nothing_here"], "has no attribute"),
    (["show", "x", "--app", "no_such_module:registry"], "not found"),
    (["graph", "nope"], "no workflow named 'nope'"),
])
def test_user_mistakes_are_one_line_and_a_non_zero_exit(tmp_path: Path, args: list[str],
                                                        needle: str) -> None:
    if "--store" not in args and args[0] != "graph":
        args = [*args, "--store", empty_store(tmp_path)]
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


def empty_store(folder: Path) -> str:
    """A SQLite store that exists and holds no run (read-only commands refuse a missing one)."""
    url = f"sqlite:///{folder / 'empty.db'}"
    open_store(url).close()
    return url


def test_runs_on_an_empty_store_says_so(tmp_path: Path) -> None:
    done = rulebound("runs", "--store", empty_store(tmp_path))
    assert done.returncode == 0
    assert "0 shown of 0 runs" in done.stdout


BROKEN_APPS = {
    "syntax.py": ("from engine import Registry\nregistry = Registry(\n    workflows=[\n"
                  "def oops(:\n", "SyntaxError in"),
    "raises.py": ("raise RuntimeError('the config server\\nis down')\n",
                  "raised RuntimeError: the config server is down"),
    "exits.py": ("import sys\nsys.exit(3)\n", "raised SystemExit: 3"),
    "factory.py": ("def make():\n    raise KeyError('OPENAI_API_KEY')\n",
                   "calling 'make' raised KeyError"),
}


@pytest.mark.parametrize("name", sorted(BROKEN_APPS))
def test_a_broken_app_is_one_line(tmp_path: Path, name: str) -> None:
    source, needle = BROKEN_APPS[name]
    (tmp_path / name).write_text(source)
    attr = "make" if name == "factory.py" else "registry"
    for spec in (f"{tmp_path / name}:{attr}", f"{name.removesuffix('.py')}:{attr}"):
        done = rulebound("show", "x", "--app", spec, "--store",
                         f"sqlite:///{tmp_path / 'x.db'}", cwd=tmp_path)
        assert done.returncode == 1
        assert "Traceback" not in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert needle in done.stderr, done.stderr
        assert done.stderr.startswith(f"rulebound: --app {spec!r}")


@pytest.mark.parametrize(("content", "needle"), [
    (b"[1, 2]\n", ":1: not a JSON object (got list)"),
    (b'{"manifest": 1}\n"text"\n', ":2: not a JSON object (got str)"),
    (b"\n\n", "empty"),
    (b'{"a": 1}\n\xff\xfe\n', ":2: not UTF-8 text"),
])
def test_verify_refuses_a_file_that_is_not_an_export(tmp_path: Path, content: bytes,
                                                     needle: str) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(content)
    done = rulebound("verify", str(bad))
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert needle in done.stderr


def test_a_verify_decode_failure_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"run_id": "11111111-1111-4111-8111-111111111111", "seq": 1, '
                   '"id": "22222222-2222-4222-8222-222222222222", "hash": "y", '
                   '"event": {"type": "RunStarted", "at": "yesterday"}}\n')
    done = rulebound("verify", str(bad), "--partial")
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert len(done.stdout.strip().splitlines()) == 1, done.stdout
    assert "event 1: decode: RunStarted.at: Input should be a valid datetime" in done.stdout


def test_verify_refuses_a_malformed_anchor(tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    log.write_text('{"manifest": {}}\n')
    done = rulebound("verify", str(log), "--head", "abc123")
    assert done.returncode == 1
    assert len(done.stderr.strip().splitlines()) == 1
    assert "--head 'abc123': expected a head hash of 64 hex digits" in done.stderr


def test_export_to_a_missing_folder_names_the_target(demo_store: str, tmp_path: Path) -> None:
    run = run_ids(demo_store)[0]
    target = tmp_path / "missing" / "dir" / "run.jsonl"
    done = rulebound("export", run, "--store", demo_store, "-o", str(target))
    assert done.returncode == 1
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert f"cannot write {target}: no directory" in done.stderr
    assert ".tmp" not in done.stderr
    done = rulebound("export", run, "--store", demo_store, "-o", str(tmp_path))
    assert done.returncode == 1
    assert "it is a directory" in done.stderr
    assert not list(tmp_path.glob("*.tmp"))


def test_a_closed_pipe_is_not_an_error(demo_store: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "rulebound.adapters.cli", "runs", "--store",
                             demo_store, "--limit", "1000"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, cwd=ROOT)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # like `| head` that has already read what it wanted
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) != 0
    assert err == "", err


def test_serve_refuses_a_public_address_before_opening_the_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    db = tmp_path / "serve.db"
    monkeypatch.delenv("RULEBOUND_TOKEN", raising=False)  # the child inherits os.environ
    done = rulebound("serve", "--host", "0.0.0.0", "--port", "0", "--store", f"sqlite:///{db}")
    assert done.returncode == 1
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "refusing to serve on 0.0.0.0 without a token" in done.stderr
    assert "serving" not in done.stderr
    assert not db.exists()  # the engine never opened: no store, no recovery
