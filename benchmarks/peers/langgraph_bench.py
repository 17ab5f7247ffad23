"""LangGraph: a StateGraph of five async nodes, compiled with a checkpointer.

As its persistence docs recommend: InMemorySaver in memory, AsyncSqliteSaver (aiosqlite; it
switches the file to WAL itself) on SQLite, one thread_id per run, `ainvoke`. Durability is
"sync", the strongest mode: each step's checkpoint is written before the next step starts
(the default, "async", writes it while the next step already runs). A crashed thread is
resumed by invoking it again with input None. Checked afterwards: every thread's latest
checkpoint holds n == 5 and the file holds a checkpoint per step.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypedDict

from langgraph.checkpoint.memory import InMemorySaver
from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver
from langgraph.graph import END, START, StateGraph

from benchmarks.common import (
    STEP_SLEEP,
    STEPS,
    W4_ID,
    Ledger,
    check,
    rows,
    time_concurrent,
    time_sequential,
)

NAME = "langgraph"
DURABILITY = "sync"


class State(TypedDict):
    n: int


def graph(delay: float = 0.0, ledger: Ledger | None = None, hang: bool = False
          ) -> StateGraph:
    """START -> s1 -> ... -> s5 -> END; each node adds one to n."""
    builder = StateGraph(State)
    previous = START
    for index in range(1, STEPS + 1):
        async def node(state: State, index: int = index) -> dict[str, int]:
            if ledger is not None:
                await ledger.step(index, hang)
            elif delay:
                await asyncio.sleep(delay)
            return {"n": state["n"] + 1}
        builder.add_node(f"s{index}", node)
        builder.add_edge(previous, f"s{index}")
        previous = f"s{index}"
    builder.add_edge(previous, END)
    return builder


@asynccontextmanager
async def saver(store: str, db: Path | None) -> AsyncIterator[Any]:
    if store == "memory":
        yield InMemorySaver()
        return
    async with AsyncSqliteSaver.from_conn_string(str(db)) as checkpointer:
        yield checkpointer


def _config(thread: str) -> dict[str, Any]:
    return {"configurable": {"thread_id": thread}}


async def _verify(store: str, db: Path | None, threads: list[str]) -> str:
    """Read every thread's latest checkpoint back through a new saver on the same file."""
    async with saver(store, db) as checkpointer:
        compiled = graph().compile(checkpointer=checkpointer)
        for thread in threads:
            snapshot = await compiled.aget_state(_config(thread))
            check(snapshot.values.get("n") == STEPS and not snapshot.next,
                  f"langgraph thread {thread}: state {snapshot.values}, next {snapshot.next}")
    counts = dict(rows(db, "SELECT thread_id, count(*) FROM checkpoints GROUP BY thread_id"))
    short = [t for t in threads if counts.get(t, 0) < STEPS + 1]
    check(not short, f"langgraph: {len(short)} threads lack a checkpoint per step")
    return f"{len(threads)} threads at n=5, {sum(counts.values())} checkpoints in the file"


async def _measure(store: str, db: Path | None, runs: int, delay: float, timer: Any
                   ) -> dict[str, Any]:
    threads: list[str] = []
    async with saver(store, db) as checkpointer:
        compiled = graph(delay).compile(checkpointer=checkpointer)

        async def run_one(i: int) -> None:
            thread = f"run-{i}"
            out = await compiled.ainvoke({"n": 0}, _config(thread), durability=DURABILITY)
            check(out["n"] == STEPS, f"langgraph run {i} returned {out}")
            if i >= 0:
                threads.append(thread)

        result = await timer(run_one, runs)
        if store == "memory":
            for thread in threads:
                latest = await checkpointer.aget_tuple(_config(thread))
                check(latest is not None and latest.checkpoint["channel_values"]["n"] == STEPS,
                      f"langgraph thread {thread} has no final checkpoint")
            result["verified"] = f"{len(threads)} threads' latest checkpoints at n=5"
    check(len(threads) == runs, f"langgraph: {len(threads)} of {runs} runs finished")
    if store == "sqlite":
        result["verified"] = await _verify(store, db, threads)
    return result


async def sequential(store: str, db: Path | None, runs: int) -> dict[str, Any]:
    return await _measure(store, db, runs, 0.0, time_sequential)


async def concurrent(store: str, db: Path | None, runs: int) -> dict[str, Any]:
    return await _measure(store, db, runs, STEP_SLEEP, time_concurrent)


async def crash_child(db: Path, ledger: Ledger) -> None:
    ledger.mark_engine_start()
    async with saver("sqlite", db) as checkpointer:
        compiled = graph(ledger=ledger, hang=True).compile(checkpointer=checkpointer)
        await compiled.ainvoke({"n": 0}, _config(W4_ID), durability=DURABILITY)


async def crash_restart(db: Path, ledger: Ledger) -> dict[str, Any]:
    ledger.mark_engine_start()
    async with saver("sqlite", db) as checkpointer:
        compiled = graph(ledger=ledger).compile(checkpointer=checkpointer)
        out = await compiled.ainvoke(None, _config(W4_ID), durability=DURABILITY)
        check(out["n"] == STEPS, f"langgraph resumed run returned {out}")
    return {"verified": await _verify("sqlite", db, [W4_ID])}
