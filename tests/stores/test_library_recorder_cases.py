"""The eventsourcing library's own recorder test cases, run against the recorders exactly as
rulebound's stores configure them (POPO; SQLite file in WAL mode with our lock timeout and
pool; PostgreSQL with our schema, lock timeout and pool).

Every inherited test runs; none is excluded.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from eventsourcing.persistence import ApplicationRecorder
from eventsourcing.tests.persistence import (
    ApplicationRecorderTestCase,
    NonInterleavingNotificationIDsBaseCase,
)
from rulebound.adapters.stores import open_store


class _StoreRecorders:
    url: str

    def setUp(self) -> None:
        super().setUp()  # type: ignore[misc]
        self._stores: list[Any] = []
        self._threads = set(threading.enumerate())

    def tearDown(self) -> None:
        # The library's concurrency cases can return while their reader threads are still
        # finishing a query; closing connections under them would crash SQLite. Wait first.
        for thread in set(threading.enumerate()) - self._threads:
            if not thread.daemon:  # the test's readers; connection pools run daemon workers
                thread.join(timeout=10)
        for store in self._stores:
            store.close()
        super().tearDown()  # type: ignore[misc]

    def create_recorder(self) -> ApplicationRecorder:
        store = open_store(self.url)
        self._stores.append(store)
        return store.recorder


class TestMemoryRecorder(_StoreRecorders, ApplicationRecorderTestCase[ApplicationRecorder]):
    url = "memory://"


class TestMemoryNonInterleaving(_StoreRecorders, NonInterleavingNotificationIDsBaseCase):
    url = "memory://"


class TestSQLiteRecorder(_StoreRecorders, ApplicationRecorderTestCase[ApplicationRecorder]):
    @pytest.fixture(autouse=True)
    def _file(self, tmp_path: Path) -> None:
        self.url = f"sqlite:///{tmp_path / 'recorder.db'}"


class TestSQLiteNonInterleaving(_StoreRecorders, NonInterleavingNotificationIDsBaseCase):
    @pytest.fixture(autouse=True)
    def _file(self, tmp_path: Path) -> None:
        self.url = f"sqlite:///{tmp_path / 'recorder.db'}"


@pytest.mark.postgres
class TestPostgresRecorder(_StoreRecorders, ApplicationRecorderTestCase[ApplicationRecorder]):
    # Rollbacks leave gaps in PostgreSQL sequences; the library's own Postgres case says so.
    EXPECT_CONTIGUOUS_NOTIFICATION_IDS = False

    @pytest.fixture(autouse=True)
    def _database(self, postgres_url: str) -> None:
        self.url = postgres_url


@pytest.mark.postgres
class TestPostgresNonInterleaving(_StoreRecorders, NonInterleavingNotificationIDsBaseCase):
    @pytest.fixture(autouse=True)
    def _database(self, postgres_url: str) -> None:
        self.url = postgres_url
