"""Paper cuts a newcomer meets on the command line: a mistyped store, a live run's counts,
`verify` without the definitions, and exit codes that keep their meanings."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from rulebound.adapters.cli import main
from rulebound.domain import FAIL
from rulebound.engine import load_app

from rulebound import Engine, Step, WaitForSignal, Workflow
from tests.audit.test_verify import until_waiting, write_app
from tests.cli.test_cli import rulebound

RUN = "00000000-0000-4000-8000-000000000000"


@pytest.mark.parametrize("args", [
    ["runs"], ["show", RUN], ["explain", RUN], ["export", RUN], ["replay", RUN],
    ["replay", RUN, "--verify"], ["graph", "support-triage", "--run", RUN],
])
def test_a_read_only_command_refuses_a_store_file_that_does_not_exist(
        tmp_path: Path, args: list[str]) -> None:
    typo = tmp_path / "typo.db"
    done = rulebound(*args, "--store", f"sqlite:///{typo}", cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"rulebound: no store at {str(typo)!r}: the SQLite file does not exist (check --store "
        "or RULEBOUND_STORE; `rulebound demo` and `rulebound serve` create one)"]
    assert not typo.exists()
    assert list(tmp_path.iterdir()) == []  # no -wal, no -shm either


def test_the_default_store_is_not_created_by_a_read_either(tmp_path: Path) -> None:
    done = rulebound("runs", cwd=tmp_path)
    assert done.returncode == 1
    assert "no store at 'rulebound.db'" in done.stderr
    assert not (tmp_path / "rulebound.db").exists()


async def test_runs_shows_a_running_runs_events_and_time_so_far(tmp_path: Path) -> None:
    async def note(data: Any) -> dict[str, Any]:
        return {"noted": data}

    wf = Workflow("waits", on_failure=FAIL, steps=[
        Step("first", executor="note", next="second"),
        Step("second", executor="note", next="approve"),
        WaitForSignal("approve", signal="ok", timeout=3600)])
    store = f"sqlite:///{tmp_path / 'runs.db'}"
    async with Engine(store, [wf], {"note": note}) as engine:
        run_id = await engine.start("waits", {"n": 1})
        await until_waiting(engine, run_id)
        events = len(await engine.events(run_id))
    assert events > 5  # started, two steps' worth of facts, the wait

    done = await asyncio.to_thread(rulebound, "runs", "--store", store)
    assert done.returncode == 0, done.stderr
    row = next(line.split() for line in done.stdout.splitlines() if str(run_id) in line)
    assert row[2] == "running"
    assert int(row[3]) == events
    assert float(row[6]) > 0  # STARTED takes two columns: date and time

    listed = await asyncio.to_thread(rulebound, "runs", "--store", store, "--json")
    line = json.loads(listed.stdout.splitlines()[0])
    assert line["version"] == events
    assert line["updated_at"] > line["created_at"]


@pytest.fixture
def exported(tmp_path: Path) -> dict[str, Any]:
    """A completed run of the audit test app, exported to a file."""
    app = write_app(tmp_path / "app.py")
    store = f"sqlite:///{tmp_path / 'runs.db'}"

    async def run() -> str:
        async with Engine(store, registry=load_app(app)) as engine:
            run_id = await engine.start("audited", {"ticket": 1})
            await until_waiting(engine, run_id)
            await engine.signal(run_id, "ok", {"by": "auditor"})
            assert (await engine.wait(run_id, timeout=5)).status == "completed"
            return str(run_id)

    run_id = asyncio.run(run())
    export = tmp_path / "run.jsonl"
    assert main(["export", run_id, "--store", store, "-o", str(export)]) == 0
    return {"app": app, "export": export, "store": store, "run": run_id}


def test_show_and_replay_count_in_words_that_agree(exported: dict[str, Any],
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()  # the run's classify step failed once and was retried once
    assert main(["show", exported["run"], "--store", exported["store"],
                 "--app", exported["app"]]) == 0
    assert "; 3 attempts, 1 retry\n" in capsys.readouterr().out
    assert main(["replay", exported["run"], "--store", exported["store"],
                 "--app", exported["app"]]) == 0
    assert ", 1 retry\n" in capsys.readouterr().out


def test_verify_without_the_definitions_is_not_reported_as_tampering(
        exported: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert main(["verify", str(exported["export"])]) == 4
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    assert out[0].startswith(f"UNCHECKED: {exported['export']}: ")
    assert "chain intact, fold clean; decisions not re-derived: workflow 'audited'" in out[0]
    assert "the demo's registry (no --app given): pass --app module:attr" in out[0]
    assert "FAILED" not in out[0]

    assert main(["verify", str(exported["export"]), "--app", exported["app"]]) == 0
    assert capsys.readouterr().out.startswith("OK: ")

    rows = exported["export"].read_text().splitlines()
    assert '"ticket": 1' in rows[0]
    rows[0] = rows[0].replace('"ticket": 1', '"ticket": 2')  # the RunStarted input, edited
    exported["export"].write_text("\n".join(rows) + "\n")
    assert main(["verify", str(exported["export"])]) == 2  # tampered, with or without --app
    assert capsys.readouterr().out.startswith("FAILED: ")


def test_verify_documents_its_exit_codes() -> None:
    done = rulebound("verify", "--help")
    assert done.returncode == 0
    text = done.stdout
    for code in ("0  OK: every check passed", "1  the command could not run",
                 "2  FAILED: a divergence", "3  NOTICE only", "4  UNCHECKED"):
        assert code in text


def test_a_malformed_command_line_exits_1_not_verifys_2() -> None:
    done = rulebound("verify")
    assert done.returncode == 1
    assert "the following arguments are required: file" in done.stderr
