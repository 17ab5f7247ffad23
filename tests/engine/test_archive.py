"""Retention through the engine's archive(): on every store, ended runs leave the store only
with a verified file behind them; running runs stay (and go on); an interrupted pass is
finished by the next; a run whose export does not verify is kept."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from rulebound.adapters.stores import open_store
from rulebound.domain.definitions import FAIL
from rulebound.engine.archive import archive
from rulebound.engine.audit import EXIT_OK, verify_lines
from rulebound.engine.store import RunChange

from rulebound import Engine, Step, Workflow
from tests.cli.archive_app import registry

FUTURE = datetime.now(UTC) + timedelta(days=1)


def finder(definition_hash: str, name: str) -> Any:
    return registry.by_hash(definition_hash)


async def _runs(engine: Engine, *, paid: int = 5, broken: int = 2) -> tuple[list[str], str]:
    ended = []
    for i in range(paid):
        ended.append(str(await engine.start("pay", {"n": i})))
    for i in range(broken):
        ended.append(str(await engine.start("broken", {"n": i})))
    for run in ended:
        await engine.wait(run, timeout=10)
    holding = str(await engine.start("hold", {"n": 0}))
    for _ in range(100):  # until it waits for its signal
        if (await engine.get(holding)).steps.get("wait", None) is not None:
            break
        await asyncio.sleep(0.01)
    await engine.storage.project()
    return ended, holding


def _verified(path: Path) -> Any:
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    return verify_lines(lines, finder)


async def test_ended_runs_move_to_verified_files_and_running_runs_stay(
        store_url: str, tmp_path: Path) -> None:
    store = open_store(store_url)
    async with Engine(store, registry=registry) as engine:
        ended, holding = await _runs(engine)
        out = tmp_path / "archive"
        result = await asyncio.to_thread(archive, store, out, ended_before=FUTURE,
                                         definition_for=finder)
        assert result.archived == len(ended) and not result.kept and result.failed == 0
        assert sorted(p.stem for p in out.iterdir()) == sorted(ended)
        for run in ended:
            assert store.read(UUID(run)) == []
            report = _verified(out / f"{run}.jsonl")
            assert report.exit_code == EXIT_OK and report.terminal, report.findings
        # the running run is untouched, listed, and still goes on
        assert [str(r.run_id) for r in store.list_runs()] == [holding]
        await engine.signal(holding, "go", {"ok": True})
        assert (await engine.wait(holding, timeout=10)).status == "completed"
        # a second pass takes it, once the read model knows it ended
        await engine.storage.project()
        again = await asyncio.to_thread(archive, store, out, ended_before=FUTURE,
                                        definition_for=finder)
        assert again.archived == 1 and len(list(out.iterdir())) == len(ended) + 1


async def test_the_cut_off_and_the_workflow_filter_keep_runs(store_url: str,
                                                             tmp_path: Path) -> None:
    store = open_store(store_url)
    async with Engine(store, registry=registry) as engine:
        await _runs(engine, paid=2, broken=2)
        past = datetime.now(UTC) - timedelta(days=1)
        early = await asyncio.to_thread(archive, store, tmp_path / "a", ended_before=past)
        assert early.archived == 0 and not list((tmp_path / "a").iterdir())
        only = await asyncio.to_thread(archive, store, tmp_path / "a", ended_before=FUTURE,
                                       workflow="broken", definition_for=finder)
        assert only.archived == 2
        assert sorted(r.workflow for r in store.list_runs()) == ["hold", "pay", "pay"]


async def test_an_interrupted_pass_is_finished_by_the_next(store_url: str,
                                                           tmp_path: Path) -> None:
    store = open_store(store_url)
    async with Engine(store, registry=registry) as engine:
        ended, holding = await _runs(engine, paid=6, broken=1)
        out = tmp_path / "archive"

        def cut(secured: int) -> None:
            if secured == 5:  # the 5th file is written and verified, its run not removed
                raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            await asyncio.to_thread(archive, store, out, ended_before=FUTURE,
                                    definition_for=finder, batch=2, after_secured=cut)
        (out / "left-over.jsonl.tmp").write_text("half a file")
        files = {p.stem for p in out.glob("*.jsonl")}
        assert len(files) == 5
        stored = {str(r.run_id) for r in store.list_runs()}
        assert len(stored) == 1 + 1 + 2  # the hold run, the 5th run and two never reached
        # nothing lost: every ended run is in the store or in a verified file (or both)
        for run in ended:
            assert run in stored or _verified(out / f"{run}.jsonl").exit_code == EXIT_OK
        result = await asyncio.to_thread(archive, store, out, ended_before=FUTURE,
                                         definition_for=finder)
        assert result.archived == 3 and result.reused == 1 and not result.kept
        assert not list(out.glob("*.tmp"))
        assert [str(r.run_id) for r in store.list_runs()] == [holding]
        assert sorted(p.stem for p in out.glob("*.jsonl")) == sorted(ended)


async def test_a_run_whose_export_does_not_verify_is_kept(store_url: str,
                                                          tmp_path: Path) -> None:
    changed = Workflow("pay", on_failure=FAIL, steps=[Step("book", executor="echo")])
    store = open_store(store_url)
    async with Engine(store, registry=registry) as engine:
        ended, _ = await _runs(engine, paid=2, broken=1)
        out = tmp_path / "archive"

        def other(definition_hash: str, name: str) -> Any:  # pay's decisions differ now
            return changed if name == "pay" else finder(definition_hash, name)

        result = await asyncio.to_thread(archive, store, out, ended_before=FUTURE,
                                         definition_for=other)
        assert result.archived == 1 and result.failed == 2
        assert all("does not verify" in why for _, why in result.kept)
        assert [p.stem for p in out.iterdir()] == [ended[2]]  # only the archived run's file
        assert sorted(r.workflow for r in store.list_runs()) == ["hold", "pay", "pay"]


async def test_a_running_run_is_never_archived_whatever_the_read_model_says(
        store_url: str, tmp_path: Path) -> None:
    store = open_store(store_url)
    async with Engine(store, registry=registry) as engine:
        _, holding = await _runs(engine, paid=0, broken=0)
        # a read model that is wrong: it says the waiting run completed two days ago
        store.apply_run_changes([RunChange(UUID(holding), "completed", 99,
                                           datetime.now(UTC) - timedelta(days=2))],
                                store.last_position() + 1)
        assert [r.status for r in store.list_runs()] == ["completed"]
        result = await asyncio.to_thread(archive, store, tmp_path / "a", ended_before=FUTURE,
                                         definition_for=finder)
        assert result.archived == 0 and result.kept == [(UUID(holding), "still going")]
        assert not list((tmp_path / "a").iterdir())
        await engine.signal(holding, "go", {"ok": True})
        assert (await engine.wait(holding, timeout=10)).status == "completed"
