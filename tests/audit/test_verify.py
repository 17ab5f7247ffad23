"""Auditors hold an exported log and the definition: verify catches every kind of tampering,
replay --verify catches a changed definition, and cosmetic edits do not trip it."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from rulebound.adapters.cli import main
from rulebound.engine import Engine, codec, load_app

APP = '''
from pydantic import BaseModel
from rulebound.domain import FAIL, Limits, Retry, Route, Step, WaitForSignal, Workflow, field
from rulebound.engine import Registry, RetryableError


class Label(BaseModel):
    category: str


async def classify(task):
    if task.attempt == 1:
        raise RetryableError("busy", kind="server_error")
    return {{"category": "billing"}}


async def echo(task):
    return {{"done": task.step}}


wf = Workflow("audited", description={description!r}, on_failure=FAIL, limits={limits}, steps=[
    Step("classify", executor="llm", output=Label, retry=Retry(attempts={attempts}, backoff=0),
         routes=[Route("approve", when=field("classify.category") == {value!r})],
         next="other"),
    WaitForSignal("approve", signal="ok", timeout=60, next="send"),
    Step("send", executor="fn"), Step("other", executor="fn", timeout={other_timeout})])
registry = Registry(workflows=[wf], executors={{"llm": classify, "fn": echo}})
'''


def write_app(path: Path, *, description: str = "v1", attempts: int = 3,
              value: str = "billing", limits: str = "Limits()",
              other_timeout: float = 60.0) -> str:
    path.write_text(APP.format(description=description, attempts=attempts, value=value,
                               limits=limits, other_timeout=other_timeout))
    return f"{path}:registry"


async def until_waiting(engine: Engine, run_id: Any) -> None:
    """Until the run waits for its signal (5 s at most, then the test fails)."""
    for _ in range(500):
        if (await engine.get(run_id)).waiting_for:
            return
        await asyncio.sleep(0.01)
    pytest.fail("the run never came to wait for its signal")


@pytest.fixture
def recorded(tmp_path: Path) -> dict[str, Any]:
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
    return {"app": app, "store": store, "run": run_id, "export": export, "tmp": tmp_path}


def lines(path: Path) -> list[dict[str, Any]]:
    """The event lines of an export (without its closing manifest line)."""
    return [row for row in all_lines(path) if "manifest" not in row]


def all_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def manifest_of(path: Path) -> dict[str, Any]:
    last = all_lines(path)[-1]
    assert set(last) == {"manifest"}
    return last


def write_lines(path: Path, rows: list[dict[str, Any]],
                manifest: dict[str, Any] | None = None) -> Path:
    """Write event lines, then `manifest` (a manifest line) if given."""
    out = [*rows, manifest] if manifest is not None else rows
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in out))
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
    code, out = verify(write_lines(recorded["tmp"] / "bad.jsonl", bad,
                                   manifest_of(recorded["export"])), recorded["app"], capsys)
    assert code == 2, out
    assert f"event {first_bad}:" in out, out


def test_a_forged_hash_for_an_edited_event_breaks_the_next_link(
    recorded: dict[str, Any], capsys: pytest.CaptureFixture[str],
) -> None:
    from rulebound.engine.codec import decode

    rows = lines(recorded["export"])
    index = next(i for i, r in enumerate(rows) if r["event"]["type"] == "AttemptSucceeded")
    rows[index]["event"]["output"] = {"category": "refund"}
    event = decode(json.dumps({"id": rows[index]["id"], "hash": "x",
                               "event": rows[index]["event"]}))
    rows[index]["hash"] = codec.chain_hash(rows[index - 1]["hash"],
                                           codec.canonical_body(event))
    code, out = verify(write_lines(recorded["tmp"] / "forged.jsonl", rows,
                                   manifest_of(recorded["export"])), recorded["app"], capsys)
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


# --- completeness and anchoring --------------------------------------------------------


def rechain(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What a forger who can rewrite the whole file does: recompute every hash."""
    from rulebound.engine import codec

    prev = codec.GENESIS_HASH
    for row in rows:
        row["hash"] = prev = codec.chain_hash(prev, codec.to_json(row["event"]))
    return rows


def forged_manifest(rows: list[dict[str, Any]], template: dict[str, Any]) -> dict[str, Any]:
    last = rows[-1]["event"]["type"]
    terminal = last in {"RunCompleted", "RunFailed", "RunCancelled"}
    return {"manifest": {**template["manifest"], "events": len(rows),
                         "head_hash": rows[-1]["hash"], "terminal": terminal,
                         "status": "completed" if terminal else "running"}}


def store_head(recorded: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(["show", recorded["run"], "--store", recorded["store"], "--app",
                 recorded["app"], "--json"]) == 0
    head = json.loads(capsys.readouterr().out)["head_hash"]
    assert main(["show", recorded["run"], "--store", recorded["store"], "--app",
                 recorded["app"]]) == 0
    assert f"head      {head} (event " in capsys.readouterr().out
    return str(head)


def test_the_export_closes_with_a_manifest(recorded: dict[str, Any]) -> None:
    rows = lines(recorded["export"])
    manifest = manifest_of(recorded["export"])["manifest"]
    assert manifest == {"format": "rulebound-export/1", "run_id": recorded["run"],
                        "events": len(rows), "head_hash": rows[-1]["hash"],
                        "terminal": True, "status": "completed"}


def test_truncation_at_the_end_without_the_manifest_is_incomplete(
    recorded: dict[str, Any], capsys: pytest.CaptureFixture[str],
) -> None:
    rows = lines(recorded["export"])
    cut = max(i for i, r in enumerate(rows) if r["event"]["type"] == "AttemptStarted")
    prefix = rows[:cut + 1]  # ends on an AttemptStarted: the decider has nothing to add
    path = write_lines(recorded["tmp"] / "cut.jsonl", prefix)
    code, out = verify(path, recorded["app"], capsys)
    assert code == 2, out
    assert "incomplete/unanchored" in out
    assert "--partial" in out

    code = main(["verify", str(path), "--app", recorded["app"], "--partial"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"{len(prefix)} events" in out
    assert "PARTIAL" in out
    assert "unanchored" in out


def test_truncation_to_a_prefix_with_the_manifest_kept_is_named(
    recorded: dict[str, Any], capsys: pytest.CaptureFixture[str],
) -> None:
    rows = lines(recorded["export"])
    manifest = manifest_of(recorded["export"])
    for keep in (len(rows) - 1, 15, 1, 0):
        path = write_lines(recorded["tmp"] / f"prefix{keep}.jsonl", rows[:keep], manifest)
        for extra in ([], ["--partial"]):  # --partial does not excuse a short log
            code = main(["verify", str(path), "--app", recorded["app"], *extra])
            out = capsys.readouterr().out
            assert code == 2, out
            if keep:
                assert f"event {keep + 1}: completeness: missing: the log ends after event " \
                       f"{keep} but its manifest says {len(rows)} events" in out, out


def test_the_manifest_itself_is_checked(recorded: dict[str, Any],
                                        capsys: pytest.CaptureFixture[str]) -> None:
    rows = lines(recorded["export"])
    good = manifest_of(recorded["export"])

    def edited(**change: Any) -> dict[str, Any]:
        return {"manifest": {**good["manifest"], **change}}

    cases: list[tuple[str, list[dict[str, Any]], str]] = [
        ("count", [*rows, edited(events=len(rows) - 1)], "the manifest says"),
        ("count up", [*rows, edited(events=len(rows) + 3)], "missing"),
        ("head", [*rows, edited(head_hash="ab" * 32)], "head hash"),
        ("run", [*rows, edited(run_id="00000000-0000-4000-8000-000000000000")],
         "the manifest is for run"),
        ("terminal", [*rows, edited(terminal=False)], "the manifest says the run was still"),
        ("format", [*rows, edited(format="other")], "malformed manifest"),
        ("not an object", [*rows, {"manifest": [1]}], "malformed manifest"),
        ("twice", [*rows, good, good], "2 manifest lines"),
        ("not last", [*rows[:-1], good, rows[-1]], "after the manifest"),
    ]
    for name, content, needle in cases:
        path = write_lines(recorded["tmp"] / f"manifest-{name.replace(' ', '-')}.jsonl",
                           content)
        code, out = verify(path, recorded["app"], capsys)
        assert code == 2, (name, out)
        assert needle in out, (name, out)


def _edit_facts_no_decision_copies(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for row in rows:
        event = row["event"]
        if event["type"] == "AttemptSucceeded":
            event["usage"] = {"cost": 0.0125, "tokens_in": 90, "tokens_out": 7}
            event["latency"] = 12.5
        if event["type"] == "AttemptFailed":
            event["message"] = "the provider was down (not true)"
    return rows


def test_a_rechained_edit_passes_the_chain_but_not_the_store_anchor(
    recorded: dict[str, Any], capsys: pytest.CaptureFixture[str],
) -> None:
    head = store_head(recorded, capsys)
    assert head == manifest_of(recorded["export"])["manifest"]["head_hash"]

    rows = rechain(_edit_facts_no_decision_copies(lines(recorded["export"])))
    path = write_lines(recorded["tmp"] / "rechained.jsonl", rows,
                       forged_manifest(rows, manifest_of(recorded["export"])))
    code, out = verify(path, recorded["app"], capsys)
    assert code == 0, out  # the documented limit of an unkeyed chain ...
    assert "unanchored" in out

    code = main(["verify", str(path), "--app", recorded["app"], "--head", head])
    out = capsys.readouterr().out
    assert code == 2, out  # ... which the anchor from the store closes
    assert "anchor" in out
    assert "re-chained" in out

    code = main(["verify", str(recorded["export"]), "--app", recorded["app"],
                 "--head", head.upper()])
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"anchored: the head hash {head} is the --head anchor" in out


def test_a_rechained_truncation_with_a_rewritten_manifest_is_caught_by_the_anchor(
    recorded: dict[str, Any], capsys: pytest.CaptureFixture[str],
) -> None:
    head = store_head(recorded, capsys)
    rows = lines(recorded["export"])
    cut = max(i for i, r in enumerate(rows) if r["event"]["type"] == "AttemptStarted")
    prefix = rows[:cut + 1]
    path = write_lines(recorded["tmp"] / "short.jsonl", prefix,
                       forged_manifest(prefix, manifest_of(recorded["export"])))
    assert verify(path, recorded["app"], capsys)[0] == 0  # consistent, so only ...
    code = main(["verify", str(path), "--app", recorded["app"], "--head", head])
    out = capsys.readouterr().out
    assert code == 2, out  # ... the anchor shows that events are missing
    assert "is not the --head anchor" in out


def test_an_anchor_inside_the_log_names_the_uncovered_events(
    recorded: dict[str, Any], capsys: pytest.CaptureFixture[str],
) -> None:
    rows = lines(recorded["export"])
    code = main(["verify", str(recorded["export"]), "--app", recorded["app"],
                 "--head", rows[9]["hash"]])
    out = capsys.readouterr().out
    assert code == 2
    assert f"event 11: anchor: the --head anchor is the hash of event 10; the log goes on " \
           f"for {len(rows) - 10} more events the anchor does not cover" in out
    assert main(["verify", str(recorded["export"]), "--app", recorded["app"],
                 "--head", rows[-2]["hash"]]) == 2
    assert f"the --head anchor is the hash of event {len(rows) - 1}; the log goes on for " \
           "1 more event the anchor" in capsys.readouterr().out


def test_an_anchor_stands_in_for_a_lost_manifest(recorded: dict[str, Any],
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    rows = lines(recorded["export"])
    path = write_lines(recorded["tmp"] / "no-manifest.jsonl", rows)
    code = main(["verify", str(path), "--app", recorded["app"], "--head", rows[-1]["hash"]])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "complete up to the --head anchor" in out


def test_a_value_rewritten_to_a_coercible_form_is_an_edit(
    recorded: dict[str, Any], capsys: pytest.CaptureFixture[str],
) -> None:
    rows = lines(recorded["export"])
    index = next(i for i, r in enumerate(rows) if r["event"]["type"] == "AttemptFailed")
    rows[index]["event"]["latency"] = str(rows[index]["event"]["latency"])  # "6.5e-05"
    rows = rechain(rows)  # so the hashes hold and only the round trip can tell
    path = write_lines(recorded["tmp"] / "coerced.jsonl", rows,
                       forged_manifest(rows, manifest_of(recorded["export"])))
    code, out = verify(path, recorded["app"], capsys)
    assert code == 2, out
    assert out.splitlines() == [
        f"FAILED: {path}: event {index + 1}: integrity: AttemptFailed: its content does not "
        "round-trip: decoded and serialised again it is not what was hashed (edited, or "
        "recorded by another schema version)"]


def _sqlite_rows(store: str) -> Any:
    import sqlite3

    return sqlite3.connect(store.removeprefix("sqlite:///"))


def test_replay_verify_checks_the_bytes_the_store_holds(
    recorded: dict[str, Any], capsys: pytest.CaptureFixture[str],
) -> None:
    args = ["replay", recorded["run"], "--verify", "--store", recorded["store"],
            "--app", recorded["app"]]
    head = store_head(recorded, capsys)
    assert main(args) == 0
    assert f"head: {head}" in capsys.readouterr().out

    db = _sqlite_rows(recorded["store"])
    originator = UUID(recorded["run"]).hex  # how the SQLite store keeps a run's id
    (seq, state), = db.execute(
        "SELECT originator_version, state FROM rulebound_events WHERE originator_id = ? "
        "AND topic = 'AttemptFailed'", (originator,)).fetchall()
    stored = json.loads(codec.expand(state, UUID(recorded["run"]), seq))  # a v2 row as v1
    coerced = {**stored, "event": {**stored["event"],
                                   "latency": str(stored["event"]["latency"])}}
    garbage = b"\x00not json"
    for tampered in (json.dumps(coerced).encode(), garbage):
        db.execute("UPDATE rulebound_events SET state = ? WHERE originator_id = ? AND "
                   "originator_version = ?", (tampered, originator, seq))
        db.commit()
        code = main(args)
        captured = capsys.readouterr()
        assert code == 2, captured.out
        assert f"FAILED: run {recorded['run']}: event {seq}:" in captured.out
        assert "Traceback" not in captured.err
        assert all(line.startswith("FAILED") for line in captured.out.splitlines())
    db.close()


# --- what the OK line may say, and labels outside the chain ------------------------------


def cancelled_export(tmp: Path) -> tuple[str, Path]:
    """A run cancelled while it waits for its signal, exported."""
    app = write_app(tmp / "app.py")
    store = f"sqlite:///{tmp / 'cancelled.db'}"

    async def run() -> str:
        async with Engine(store, registry=load_app(app)) as engine:
            run_id = await engine.start("audited", {"ticket": 2})
            await until_waiting(engine, run_id)
            await engine.cancel(run_id, "stop")
            assert (await engine.wait(run_id, timeout=5)).status == "cancelled"
            return str(run_id)

    export = tmp / "cancelled.jsonl"
    assert main(["export", asyncio.run(run()), "--store", store, "-o", str(export)]) == 0
    return app, export


def test_the_ok_line_names_the_status_the_last_event_gives_not_the_manifest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    app, export = cancelled_export(tmp_path)
    capsys.readouterr()
    code, out = verify(export, app, capsys)
    assert code == 0, out
    assert "complete per its manifest (run cancelled)" in out

    rows, manifest = lines(export), manifest_of(export)
    assert manifest["manifest"]["status"] == "cancelled"
    for claim in ("completed", "failed", "running"):  # well-formed, but not what happened
        forged = {"manifest": {**manifest["manifest"], "status": claim}}
        code, out = verify(write_lines(tmp_path / f"says-{claim}.jsonl", rows, forged), app,
                           capsys)
        assert code == 2, out
        assert out.splitlines() == [
            f"FAILED: {tmp_path / f'says-{claim}.jsonl'}: log: manifest: the manifest says "
            f"the run is '{claim}', its last event (RunCancelled) says cancelled (the "
            "manifest was edited)"]


ESC = "\x1b[32m"


def _inject_status(rows: list[dict[str, Any]], manifest: dict[str, Any]) -> None:
    manifest["manifest"]["status"] = f"completed{ESC} (all approved)"


def _inject_format(rows: list[dict[str, Any]], manifest: dict[str, Any]) -> None:
    manifest["manifest"]["format"] = f"x{ESC}\n"


def _inject_run_id(rows: list[dict[str, Any]], manifest: dict[str, Any]) -> None:
    rows[3]["run_id"] = f"{ESC}{rows[3]['run_id']}"


def _inject_seq(rows: list[dict[str, Any]], manifest: dict[str, Any]) -> None:
    rows[2]["seq"] = f"3{ESC}"


def _inject_id(rows: list[dict[str, Any]], manifest: dict[str, Any]) -> None:
    rows[1]["id"] = f"{ESC}\u202e"


def _inject_workflow(rows: list[dict[str, Any]], manifest: dict[str, Any]) -> None:
    rows[0]["event"]["workflow"] = f"audited{ESC}"
    rechain(rows)
    manifest["manifest"]["head_hash"] = rows[-1]["hash"]


@pytest.mark.parametrize("inject", [_inject_status, _inject_format, _inject_run_id,
                                    _inject_seq, _inject_id, _inject_workflow])
def test_control_characters_in_the_file_never_reach_the_terminal(
    recorded: dict[str, Any], capsys: pytest.CaptureFixture[str], inject: Any,
) -> None:
    rows, manifest = lines(recorded["export"]), manifest_of(recorded["export"])
    inject(rows, manifest)
    path = write_lines(recorded["tmp"] / "escapes.jsonl", rows, manifest)
    code, out = verify(path, recorded["app"], capsys)
    assert code == 2, out
    assert out.startswith("FAILED"), out
    assert "\x1b" not in out and "\u202e" not in out, repr(out)
    assert len(out.splitlines()) == 1, out  # no newline smuggled in either
    assert "completed" not in out or "must be one of completed" in out


def test_event_ids_must_be_unique_uuids_and_seq_a_real_number(
    recorded: dict[str, Any], capsys: pytest.CaptureFixture[str],
) -> None:
    head = store_head(recorded, capsys)

    def check(name: str, rows: list[dict[str, Any]], needle: str) -> None:
        path = write_lines(recorded["tmp"] / f"{name}.jsonl", rows,
                           manifest_of(recorded["export"]))
        code = main(["verify", str(path), "--app", recorded["app"], "--head", head])
        out = capsys.readouterr().out
        assert code == 2, (name, out)
        assert needle in out, (name, out)

    same = lines(recorded["export"])
    for row in same:
        row["id"] = "00000000-0000-4000-8000-000000000000"
    check("same-ids", same, "event 2: integrity: event id 00000000-0000-4000-8000-000000000000 "
                            "is also the id of event 1")

    swapped = lines(recorded["export"])
    swapped[4]["id"] = swapped[1]["id"]
    check("reused-id", swapped, f"event 5: integrity: event id {swapped[1]['id']} is also "
                                "the id of event 2")

    for bad in ("not-a-uuid", swapped[0]["id"].upper(), 7, None):
        malformed = lines(recorded["export"])
        malformed[2]["id"] = bad
        check("bad-id", malformed, f"event 3: decode: event id {bad!r} is not a UUID")

    for bad_seq in (True, 1.0, "1"):
        boolean = lines(recorded["export"])
        boolean[0]["seq"] = bad_seq
        check("bool-seq", boolean, f"event 1: integrity: sequence number {bad_seq!r} where 1 "
                                   "was expected")

    bad_run = lines(recorded["export"])
    for row in bad_run:
        row["run_id"] = "run-1"
    check("bad-run", bad_run, "event 1: decode: run id 'run-1' is not a UUID")


def test_a_relabelled_run_id_is_not_caught_and_the_ok_line_says_so(
    recorded: dict[str, Any], capsys: pytest.CaptureFixture[str],
) -> None:
    """The documented limit: ids and the run id are labels outside the hash chain (the stored
    format never hashed them), so a consistent relabelling passes even with the anchor."""
    head = store_head(recorded, capsys)
    other = "11111111-1111-4111-8111-111111111111"
    rows = lines(recorded["export"])
    for row in rows:
        row["run_id"] = other
    manifest = manifest_of(recorded["export"])
    manifest["manifest"]["run_id"] = other
    path = write_lines(recorded["tmp"] / "relabelled.jsonl", rows, manifest)
    code = main(["verify", str(path), "--app", recorded["app"], "--head", head])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "chain intact (event content; ids and run id are not covered)" in out
    assert "ids and the run id are not hashed" in out


def test_non_object_lines_fail_without_a_crash() -> None:
    from rulebound.engine.audit import verify_lines

    for content in ([1, {"manifest": {}}], [[], "x"], [{"manifest": 1}, 2]):
        report = verify_lines(content, lambda *_: None)
        assert not report.ok
        assert report.first is not None


def test_the_golden_histories_pass_the_chain_checks() -> None:
    """The stored logs the engine wrote (ids and all) meet what check_chain now requires."""
    from rulebound.engine.audit import Report, check_chain

    histories = sorted((Path(__file__).parents[1] / "histories").glob("*.jsonl"))
    assert histories
    for history in histories:
        stored = [json.loads(raw) for raw in history.read_text().splitlines() if raw.strip()]
        rows = [{"run_id": "56378a19-ba9e-547f-9509-3d6a157ca4f0", "seq": seq, **line}
                for seq, line in enumerate(stored, start=1)]
        report = Report()
        events = check_chain(rows, report)
        assert report.ok, (history.name, str(report.first))
        assert len(events) == len(stored)


def replay_verify(recorded: dict[str, Any], app: str,
                  capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(["replay", recorded["run"], "--verify", "--store", recorded["store"],
                 "--app", app])
    return code, capsys.readouterr().out


def test_a_changed_limit_names_event_1_and_the_first_decision_it_changes(
    recorded: dict[str, Any], capsys: pytest.CaptureFixture[str],
) -> None:
    # The run took three steps (classify, approve, send) under max_steps=100.
    fewer = write_app(recorded["tmp"] / "steps.py", limits="Limits(max_steps=2)")
    code, out = replay_verify(recorded, fewer, capsys)
    assert code == 2, out
    failed = [line for line in out.splitlines() if line.startswith("FAILED")]
    assert "event 1: limits: RunStarted does not re-derive: max_steps: recorded 100, the " \
           "definition gives 2" in failed[0]
    # ... and where the run would have gone otherwise: "send" is no longer scheduled.
    events = lines(recorded["export"])
    send = next(i for i, r in enumerate(events, start=1)
                if r["event"]["type"] == "StepScheduled" and r["event"]["step"] == "send")
    assert f"event {send}: decisions: StepScheduled does not re-derive: the definition now " \
           "decides LimitReached here" in failed[1]

    code, out = verify(recorded["export"], fewer, capsys)  # the same for an exported file
    assert code == 2 and "event 1: limits" in out


def test_a_changed_limit_no_decision_reached_is_still_a_divergence(
    recorded: dict[str, Any], capsys: pytest.CaptureFixture[str],
) -> None:
    roomy = write_app(recorded["tmp"] / "roomy.py", limits="Limits(max_steps=50)")
    code, out = replay_verify(recorded, roomy, capsys)
    assert code == 2, out
    failed = [line for line in out.splitlines() if line.startswith("FAILED")]
    assert len(failed) == 1 and "event 1: limits" in failed[0] and "max_steps" in failed[0]


def test_a_definition_notice_alone_has_its_own_exit_code(
    recorded: dict[str, Any], capsys: pytest.CaptureFixture[str],
) -> None:
    from rulebound.engine.audit import EXIT_DEFINITION_CHANGED, EXIT_FAILED, EXIT_OK

    assert (EXIT_OK, EXIT_FAILED, EXIT_DEFINITION_CHANGED) == (0, 2, 3)
    # A step the run never reached changed: a new version, yet every decision re-derives.
    unreached = write_app(recorded["tmp"] / "unreached.py", other_timeout=5.0)
    code, out = replay_verify(recorded, unreached, capsys)
    assert code == EXIT_DEFINITION_CHANGED, out
    assert out.startswith("NOTICE: ") and "event 1: definition" in out
    assert "\nOK: " in out and "FAILED" not in out
    code, out = verify(recorded["export"], unreached, capsys)
    assert code == EXIT_DEFINITION_CHANGED and "NOTICE" in out

    changed = write_app(recorded["tmp"] / "changed.py", value="refunds")
    code, out = replay_verify(recorded, changed, capsys)
    assert code == EXIT_FAILED and "NOTICE: " in out and "FAILED: " in out


def test_the_help_documents_the_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("replay", "verify"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        out = capsys.readouterr().out
        assert "exit codes:" in out
        assert "  2  FAILED: a divergence" in out and "  3  NOTICE only" in out


def test_an_old_log_keeps_the_abandoned_rule_it_ran_under() -> None:
    """The golden retry-storm run predates `max_abandoned`: its abandoned attempt was retried
    by the step's policy. Checked against a definition that caps re-runs at 0, the limit is
    not re-derived (the run never had it) and every recorded decision still re-derives."""
    from rulebound.engine.audit import EXIT_DEFINITION_CHANGED, verify_lines

    from tests.histories.golden_workflows import retry_storm

    history = Path(__file__).parents[1] / "histories" / "retry_storm.jsonl"
    stored = [json.loads(raw) for raw in history.read_text().splitlines() if raw.strip()]
    assert "max_abandoned" not in stored[0]["event"]["limits"]
    rows = [{"run_id": "56378a19-ba9e-547f-9509-3d6a157ca4f0", "seq": seq, **line}
            for seq, line in enumerate(stored, start=1)]
    from rulebound.domain import Limits, Workflow

    capped = Workflow(retry_storm.name, on_failure=retry_storm.on_failure,
                      limits=Limits(max_cost=0.05, max_abandoned=0), steps=retry_storm.steps)
    assert capped.hash != retry_storm.hash

    same = verify_lines(rows, lambda *_: retry_storm, require_manifest=False)
    assert same.ok, [str(f) for f in same.findings]
    report = verify_lines(rows, lambda *_: capped, require_manifest=False)
    assert report.exit_code == EXIT_DEFINITION_CHANGED, [str(f) for f in report.findings]
    assert report.decisions_checked == same.decisions_checked > 0
