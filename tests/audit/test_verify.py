"""Auditors hold an exported log and the definition: verify catches every kind of tampering,
replay --verify catches a changed definition, and cosmetic edits do not trip it."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from adapters.cli import main
from engine import Engine, load_app

APP = '''
from pydantic import BaseModel
from domain import FAIL, Retry, Route, Step, WaitForSignal, Workflow, field
from engine import Registry, RetryableError


class Label(BaseModel):
    category: str


async def classify(task):
    if task.attempt == 1:
        raise RetryableError("busy", kind="server_error")
    return {{"category": "billing"}}


async def echo(task):
    return {{"done": task.step}}


wf = Workflow("audited", description={description!r}, on_failure=FAIL, steps=[
    Step("classify", executor="llm", output=Label, retry=Retry(attempts={attempts}, backoff=0),
         routes=[Route("approve", when=field("classify.category") == {value!r})],
         next="other"),
    WaitForSignal("approve", signal="ok", timeout=60, next="send"),
    Step("send", executor="fn"), Step("other", executor="fn")])
registry = Registry(workflows=[wf], executors={{"llm": classify, "fn": echo}})
'''


def write_app(path: Path, *, description: str = "v1", attempts: int = 3,
              value: str = "billing") -> str:
    path.write_text(APP.format(description=description, attempts=attempts, value=value))
    return f"{path}:registry"


@pytest.fixture
def recorded(tmp_path: Path) -> dict[str, Any]:
    app = write_app(tmp_path / "app.py")
    store = f"sqlite:///{tmp_path / 'runs.db'}"

    async def run() -> str:
        async with Engine(store, registry=load_app(app)) as engine:
            run_id = await engine.start("audited", {"ticket": 1})
            for _ in range(200):
                if (await engine.get(run_id)).waiting_for:
                    break
                await asyncio.sleep(0.01)
            await engine.signal(run_id, "ok", {"by": "auditor"})
            assert (await engine.wait(run_id, timeout=5)).status == "completed"
            return str(run_id)

    run_id = asyncio.run(run())
    export = tmp_path / "run.jsonl"
    assert main(["export", run_id, "--store", store, "-o", str(export)]) == 0
    return {"app": app, "store": store, "run": run_id, "export": export, "tmp": tmp_path}


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def write_lines(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    return path


def verify(path: Path, app: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(["verify", str(path), "--app", app])
    return code, capsys.readouterr().out


def test_an_untouched_export_verifies(recorded: dict[str, Any],
                                      capsys: pytest.CaptureFixture[str]) -> None:
    code, out = verify(recorded["export"], recorded["app"], capsys)
    assert code == 0, out
    assert out.startswith("OK")
    assert "decisions re-derived" in out
    rows = lines(recorded["export"])
    assert {r["event"]["type"] for r in rows} >= {"AttemptFailed", "SignalReceived",
                                                  "TransitionTaken"}


def _edited(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    target = next(r for r in rows if r["event"]["type"] == "AttemptSucceeded")
    target["event"]["output"] = {"category": "refund"}
    return rows


def _removed(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    index = next(i for i, r in enumerate(rows) if r["event"]["type"] == "AttemptFailed")
    del rows[index]
    for seq, row in enumerate(rows, start=1):  # even with the numbers made to look right
        row["seq"] = seq
    return rows


def _reordered(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows[3], rows[4] = rows[4], rows[3]
    rows[3]["seq"], rows[4]["seq"] = 4, 5
    return rows


def _inserted(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    extra = json.loads(json.dumps(rows[-1]))
    rows.insert(5, extra)
    for seq, row in enumerate(rows, start=1):
        row["seq"] = seq
    return rows


def _renumbered(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    del rows[2]
    return rows


@pytest.mark.parametrize(("tamper", "first_bad"), [
    (_edited, None), (_removed, None), (_reordered, 4), (_inserted, 6), (_renumbered, 3),
])
def test_tampering_is_detected_at_the_first_bad_event(
    recorded: dict[str, Any], capsys: pytest.CaptureFixture[str], tamper: Any,
    first_bad: int | None,
) -> None:
    rows = lines(recorded["export"])
    original = [json.dumps(r, sort_keys=True) for r in rows]
    bad = tamper(rows)
    if first_bad is None:  # the first line whose content differs from the original
        first_bad = next(i for i, r in enumerate(bad, start=1)
                         if json.dumps({**r, "seq": i}, sort_keys=True) != original[i - 1])
    code, out = verify(write_lines(recorded["tmp"] / "bad.jsonl", bad), recorded["app"], capsys)
    assert code == 2, out
    assert f"event {first_bad}:" in out, out


def test_a_forged_hash_for_an_edited_event_breaks_the_next_link(
    recorded: dict[str, Any], capsys: pytest.CaptureFixture[str],
) -> None:
    from engine import codec
    from engine.codec import decode

    rows = lines(recorded["export"])
    index = next(i for i, r in enumerate(rows) if r["event"]["type"] == "AttemptSucceeded")
    rows[index]["event"]["output"] = {"category": "refund"}
    event = decode(json.dumps({"id": rows[index]["id"], "hash": "x",
                               "event": rows[index]["event"]}))
    rows[index]["hash"] = codec.chain_hash(rows[index - 1]["hash"],
                                           codec.canonical_body(event))
    code, out = verify(write_lines(recorded["tmp"] / "forged.jsonl", rows), recorded["app"],
                       capsys)
    assert code == 2
    assert f"event {index + 2}:" in out  # the forged link holds, the next one does not


def test_replay_verify_passes_and_catches_a_changed_definition(
    recorded: dict[str, Any], capsys: pytest.CaptureFixture[str],
) -> None:
    args = ["replay", recorded["run"], "--verify", "--store", recorded["store"]]
    assert main([*args, "--app", recorded["app"]]) == 0
    assert "OK" in capsys.readouterr().out

    cosmetic = write_app(recorded["tmp"] / "cosmetic.py", description="reworded docs")
    assert main([*args, "--app", cosmetic]) == 0
    capsys.readouterr()

    changed = write_app(recorded["tmp"] / "changed.py", value="refunds")
    assert main([*args, "--app", changed]) == 2
    out = capsys.readouterr().out
    assert "definition" in out
    assert "TransitionTaken does not re-derive" in out

    fewer = write_app(recorded["tmp"] / "fewer.py", attempts=1)
    assert main([*args, "--app", fewer]) == 2
    assert "does not re-derive" in capsys.readouterr().out


def test_graph_marks_the_path_a_run_took(recorded: dict[str, Any],
                                         capsys: pytest.CaptureFixture[str]) -> None:
    base = ["graph", "audited", "--app", recorded["app"], "--store", recorded["store"]]
    assert main([*base, "--format", "json", "--run", recorded["run"]]) == 0
    graph = json.loads(capsys.readouterr().out)
    assert [(t["from"], t["to"]) for t in graph["taken"]] == [
        ("classify", "approve"), ("approve", "send"), ("send", "$end")]
    assert main([*base, "--run", recorded["run"]]) == 0
    text = capsys.readouterr().out
    assert text.startswith("flowchart TD")
    assert text.count("linkStyle") == 3


def test_explain_covers_retries_transitions_and_waiting(recorded: dict[str, Any],
                                                        capsys: pytest.CaptureFixture[str]
                                                        ) -> None:
    assert main(["explain", recorded["run"], "--store", recorded["store"],
                 "--app", recorded["app"]]) == 0
    text = capsys.readouterr().out
    assert "FAILED with server_error" in text
    assert "retry 2/3 after server_error" in text
    assert "transition classify -> approve because classify.category == 'billing'" in text
    assert "[read classify.category=\"billing\"]" in text
    assert "signal 'ok' consumed" in text
    assert "executing s" in text
    assert "signal s" in text
