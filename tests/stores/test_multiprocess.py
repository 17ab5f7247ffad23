"""Eight processes write one SQLite file at once: nothing lost, nothing duplicated."""

from __future__ import annotations

import multiprocessing
from pathlib import Path
from uuid import UUID, uuid5

from rulebound.adapters.stores import open_store
from rulebound.engine.store import ConcurrencyConflict, Record

PROCESSES = 8
RUNS_EACH = 20
EVENTS_PER_APPEND = 3
APPENDS_PER_RUN = 4
SHARED = UUID("00000000-0000-4000-8000-00000000beef")


def _writer(url: str, worker: int, results: multiprocessing.Queue) -> None:
    store = open_store(url)
    won = 0
    try:
        for n in range(RUNS_EACH):
            run = uuid5(SHARED, f"{worker}-{n}")
            for a in range(APPENDS_PER_RUN):
                start = 1 + a * EVENTS_PER_APPEND
                store.append([Record(run, seq, "E", b'{"w":%d}' % worker)
                              for seq in range(start, start + EVENTS_PER_APPEND)])
            # Every process also races for the same positions of one shared run.
            try:
                store.append([Record(SHARED, n + 1, "E", b'{"w":%d}' % worker)])
                won += 1
            except ConcurrencyConflict:
                pass
    finally:
        store.close()
    results.put((worker, won))


def test_eight_processes_lose_and_duplicate_nothing(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    open_store(url).close()  # create the tables once, before the race
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(url, w, results)) for w in range(PROCESSES)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    wins = dict(results.get(timeout=5) for _ in procs)
    store = open_store(url)
    try:
        per_run: dict[UUID, list[int]] = {}
        position = 0
        while page := store.read_all(position, 1000):
            for note in page:
                per_run.setdefault(note.record.run_id, []).append(note.record.seq)
            position = page[-1].position
        expected = PROCESSES * RUNS_EACH * APPENDS_PER_RUN * EVENTS_PER_APPEND
        own = {r: s for r, s in per_run.items() if r != SHARED}
        assert sum(len(s) for s in own.values()) == expected  # nothing lost
        for seqs in own.values():  # nothing duplicated, no gaps, in order
            assert seqs == list(range(1, APPENDS_PER_RUN * EVENTS_PER_APPEND + 1))
        # exactly one winner per contended position
        assert sorted(per_run[SHARED]) == list(range(1, RUNS_EACH + 1))
        assert sum(wins.values()) == RUNS_EACH
    finally:
        store.close()
