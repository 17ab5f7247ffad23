"""SQLite's recorder gives up on a lock after its busy timeout ("database is locked"); the
adapter must retry with backoff instead of surfacing that as a failed write."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path
from uuid import uuid4

from rulebound.adapters.stores.sqlite import SQLiteStore
from rulebound.engine.store import Record


def test_a_lock_held_longer_than_the_busy_timeout_is_waited_out(tmp_path: Path) -> None:
    path = tmp_path / "locked.db"
    store = SQLiteStore(path, lock_timeout=1)  # the library gives up after 1 s
    run = uuid4()
    store.append([Record(run, 1, "E", b'{"n":1}')])
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN EXCLUSIVE")  # another process holds the write lock...
    released = threading.Event()

    def release_later() -> None:
        time.sleep(2.5)  # ...for longer than the busy timeout
        other.execute("COMMIT")
        released.set()

    holder = threading.Thread(target=release_later)
    holder.start()
    began = time.monotonic()
    try:
        store.append([Record(run, 2, "E", b'{"n":2}')])  # would raise without the retry
        waited = time.monotonic() - began
        assert released.is_set(), "the append went through while the lock was held"
        assert waited >= 2.0
        assert [r.seq for r in store.read(run)] == [1, 2]
    finally:
        holder.join()
        other.close()
        store.close()
