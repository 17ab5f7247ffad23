"""Apache Burr: five async function actions, one Application per run, a prebuilt graph.

As its docs recommend: actions declared with @action(reads, writes) returning the updated
State; the graph built once with GraphBuilder and shared by every Application
(ApplicationBuilder.with_graph); async apps built with `abuild()` and run with
`arun(halt_after=[...])`; on SQLite the AsyncSQLitePersister (aiosqlite, one connection shared
by all apps) saves the state after every step, before the next action runs. In memory there is
no persister (Burr keeps the state in the Application). The file is put in WAL mode first
(Burr's persister does not); sqlite3 keeps synchronous=FULL. A crashed app is resumed with
`initialize_from(persister, resume_at_next_action=True, ...)` under the same app_id. Checked
afterwards: five saved states per app_id, the latest at n == 5.
"""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path
from typing import Any

from burr.core import ApplicationBuilder, State, action
from burr.core.graph import Graph, GraphBuilder
from burr.integrations.persisters.b_aiosqlite import AsyncSQLitePersister

from benchmarks.common import (
    STEP_SLEEP,
    STEPS,
    W4_ID,
    Ledger,
    check,
    rows,
    time_concurrent,
    time_sequential,
    wal_file,
)

NAME = "burr"
LAST = f"s{STEPS}"


def _step(index: int, delay: float, ledger: Ledger | None, hang: bool) -> Any:
    @action(reads=["n"], writes=["n"])
    async def step(state: State) -> State:
        if ledger is not None:
            await ledger.step(index, hang)
        elif delay:
            await asyncio.sleep(delay)
        return state.update(n=state["n"] + 1)
    return step


def graph(delay: float = 0.0, ledger: Ledger | None = None, hang: bool = False) -> Graph:
    names = [f"s{i}" for i in range(1, STEPS + 1)]
    return (GraphBuilder()
            .with_actions(**{name: _step(i + 1, delay, ledger, hang)
                             for i, name in enumerate(names)})
            .with_transitions(*itertools.pairwise(names))
            .build())


async def persister(db: Path) -> AsyncSQLitePersister:
    wal_file(db)
    saver = await AsyncSQLitePersister.from_values(db_path=str(db))
    await saver.initialize()
    return saver


async def _verify(db: Path, apps: list[str]) -> str:
    """Five saved states per app, and the latest one (loaded by a new persister) at n=5."""
    counts = dict(rows(db, "SELECT app_id, count(*) FROM burr_state GROUP BY app_id"))
    short = [a for a in apps if counts.get(a) != STEPS]
    check(not short, f"burr: {len(short)} apps without {STEPS} saved states")
    saver = await persister(db)
    try:
        for app_id in apps:
            loaded = await saver.load(None, app_id)
            check(loaded is not None and loaded["state"]["n"] == STEPS
                  and loaded["position"] == LAST, f"burr app {app_id}: loaded {loaded}")
    finally:
        await saver.cleanup()
    return f"{len(apps)} apps with {STEPS} saved states each, the latest at n=5"


async def _measure(store: str, db: Path | None, runs: int, delay: float, timer: Any
                   ) -> dict[str, Any]:
    assert db is not None
    shared = graph(delay)
    saver = await persister(db) if store == "sqlite" else None
    apps: list[str] = []

    async def run_one(i: int) -> None:
        builder = (ApplicationBuilder().with_graph(shared).with_state(n=0)
                   .with_entrypoint("s1").with_identifiers(app_id=f"run-{i}"))
        if saver is not None:
            builder = builder.with_state_persister(saver)
        app = await builder.abuild()
        _, _, state = await app.arun(halt_after=[LAST])
        check(state["n"] == STEPS, f"burr run {i} ended at {state['n']}")
        if i >= 0:
            apps.append(f"run-{i}")

    try:
        result = await timer(run_one, runs)
    finally:
        if saver is not None:
            await saver.cleanup()
    check(len(apps) == runs, f"burr: {len(apps)} of {runs} runs finished")
    result["verified"] = (await _verify(db, apps) if store == "sqlite"
                          else f"{runs} apps ended at n=5 (no persister in memory)")
    return result


async def sequential(store: str, db: Path | None, runs: int) -> dict[str, Any]:
    return await _measure(store, db, runs, 0.0, time_sequential)


async def concurrent(store: str, db: Path | None, runs: int) -> dict[str, Any]:
    return await _measure(store, db, runs, STEP_SLEEP, time_concurrent)


async def crash_child(db: Path, ledger: Ledger) -> None:
    ledger.mark_engine_start()
    saver = await persister(db)
    app = await (ApplicationBuilder().with_graph(graph(ledger=ledger, hang=True))
                 .with_state(n=0).with_entrypoint("s1").with_identifiers(app_id=W4_ID)
                 .with_state_persister(saver).abuild())
    await app.arun(halt_after=[LAST])


async def crash_restart(db: Path, ledger: Ledger) -> dict[str, Any]:
    ledger.mark_engine_start()
    saver = await persister(db)
    try:
        app = await (ApplicationBuilder().with_graph(graph(ledger=ledger))
                     .initialize_from(saver, resume_at_next_action=True,
                                      default_state={"n": 0}, default_entrypoint="s1")
                     .with_identifiers(app_id=W4_ID).with_state_persister(saver).abuild())
        _, _, state = await app.arun(halt_after=[LAST])
        check(state["n"] == STEPS, f"burr: the resumed app ended at {state['n']}")
    finally:
        await saver.cleanup()
    # a resumed app appends to the same app_id: 3 states before the kill, 2 after
    return {"verified": await _verify(db, [W4_ID])}
