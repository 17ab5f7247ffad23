"""`Engine(retention=Retention(...))` on a real SQLite store: ended runs older than the limit
leave the store for export files that `rulebound verify` accepts; going runs and recently
ended ones stay; a failed pass is retried; close stops a pass without losing a run."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
from rulebound.adapters.stores import SQLiteStore

from rulebound import Engine, FaultyStore, Retention, RuleboundError, RunNotFound
from tests.cli.aged_runs import fill as _fill
from tests.cli.archive_app import registry

ROOT = Path(__file__).resolve().parents[2]
APP = str(ROOT / "tests" / "cli" / "archive_app.py") + ":registry"
KEEP = Retention(timedelta(days=30), "unused")  # the limit the tests archive with


async def _stored(engine: Engine) -> set[str]:
    return {str(row.run_id) for row in await engine.runs(limit=100_000)}


async def _until(predicate: object, seconds: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    give_up = loop.time() + seconds
    while not await predicate():  # type: ignore[operator]
        assert loop.time() < give_up, "timed out"
        await asyncio.sleep(0.05)


def _verify(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "rulebound", "verify", str(path), "--app",
                           APP], capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={"PYTHONPATH": str(ROOT), "PATH": ""})


async def test_old_ended_runs_leave_the_store_for_verified_files(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    old, going, recent = await _fill(url)
    out = tmp_path / "archive"
    retention = Retention(timedelta(days=30), out, every=timedelta(milliseconds=100))
    async with Engine(url, registry=registry, retention=retention) as engine:
        async def archived() -> bool:
            return not (await _stored(engine) & old)

        await _until(archived)
        assert await _stored(engine) == {going, *recent}
        for run in old:
            with pytest.raises(RunNotFound):
                await engine.get(run)
        assert (await engine.get(going)).status == "running"
        await asyncio.sleep(0.3)  # later passes find nothing more to take
        assert await _stored(engine) == {going, *recent}
    files = {p.stem: p for p in out.glob("*.jsonl")}
    assert set(files) == old
    assert not list(out.glob("*.tmp"))
    for path in [*list(files.values())[:3], files[sorted(old)[-1]]]:
        done = _verify(path)
        assert done.returncode == 0, done.stdout + done.stderr
        assert done.stdout.startswith("OK: "), done.stdout


async def test_a_failed_pass_removes_nothing_and_the_next_one_finishes(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "runs.db"
    old, going, recent = await _fill(f"sqlite:///{path}")
    store = FaultyStore(SQLiteStore(path))
    store.fail_next(1, method="delete_runs")  # the first pass writes its files, then fails
    out = tmp_path / "archive"
    retention = Retention(timedelta(days=30), out, every=timedelta(milliseconds=200))
    caplog.set_level("INFO", logger="rulebound.retention")
    async with Engine(store, registry=registry, retention=retention) as engine:
        async def archived() -> bool:
            return not (await _stored(engine) & old)

        await _until(archived)
        assert await _stored(engine) == {going, *recent}
    assert store.calls["delete_runs"] >= 2
    failed = [r for r in caplog.records if "the pass failed" in r.getMessage()]
    assert len(failed) == 1 and failed[0].levelname == "WARNING"
    assert any("archived" in r.getMessage() for r in caplog.records)
    assert {p.stem for p in out.glob("*.jsonl")} == old


async def test_close_stops_a_pass_between_runs_and_loses_none(tmp_path: Path) -> None:
    path = tmp_path / "runs.db"
    old, going, recent = await _fill(f"sqlite:///{path}")
    store = FaultyStore(SQLiteStore(path))
    store.slow(0.3, method="read")  # each run's read in the pass takes 0.3 s
    out = tmp_path / "archive"
    retention = Retention(timedelta(days=30), out, every=timedelta(hours=1))
    engine = Engine(store, registry=registry, retention=retention)
    await engine.open()
    await _until(lambda: asyncio.to_thread(lambda: any(out.glob("*.jsonl"))))
    began = time.monotonic()
    await engine.close()
    assert time.monotonic() - began < 5  # the run in hand, not the rest of the pass
    async with Engine(f"sqlite:///{path}", registry=registry) as engine:  # what it left
        stored = await _stored(engine)
    files = {p.stem for p in out.glob("*.jsonl")}
    assert {going, *recent} <= stored
    assert old <= stored | files  # each old run: still stored, or in its file, or both
    assert stored & old  # the pass was cut off: it did not run to the end (9 x 0.3 s)
    # the next engine's pass finishes the work, reusing the files already written
    retention = Retention(timedelta(days=30), out, every=timedelta(milliseconds=100))
    async with Engine(f"sqlite:///{path}", registry=registry, retention=retention) as engine:
        async def archived() -> bool:
            return not (await _stored(engine) & old)

        await _until(archived)
        assert engine.retainer is not None and engine.retainer.archived == len(stored & old)
    assert {p.stem for p in out.glob("*.jsonl")} == old


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"keep_for": timedelta(days=-1)}, "keep_for must not be negative"),
    ({"keep_for": 30}, "keep_for must be a timedelta"),
    ({"every": timedelta(0)}, "every must be positive"),
    ({"directory": ""}, "directory must name a folder"),
    ({"workflow": ""}, "workflow must be a workflow name"),
])
def test_a_setting_that_cannot_work_is_refused_by_name(kwargs: dict[str, object],
                                                      message: str) -> None:
    settings: dict[str, object] = {"keep_for": timedelta(days=30), "directory": "archive",
                                   **kwargs}
    with pytest.raises(RuleboundError, match=message) as caught:
        Retention(**settings)  # type: ignore[arg-type]
    assert isinstance(caught.value, ValueError)


def test_a_retention_is_a_value() -> None:
    assert Retention(timedelta(days=30), Path("unused")) == KEEP
    assert KEEP.every == timedelta(hours=1) and KEEP.workflow is None
