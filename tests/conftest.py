"""Shared fixtures: stores by URL (real SQLite files and a throwaway PostgreSQL, no mocks)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.pgserver import PgServer, PostgresUnavailable, binaries, start_postgres


def pytest_report_header() -> str:
    """Which PostgreSQL binaries the postgres tests will start (RULEBOUND_PG_BINARIES)."""
    try:
        return f"postgresql binaries: {binaries()}"
    except PostgresUnavailable as exc:
        return f"postgresql binaries: none ({exc})"


@pytest.fixture(params=["memory", "sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Engine tests run on the in-memory store, a real SQLite file and a real PostgreSQL."""
    if request.param == "memory":
        return "memory://"
    if request.param == "postgres":
        return str(request.getfixturevalue("postgres_url"))
    return f"sqlite:///{tmp_path / 'runs.db'}"


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'runs.db'}"


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """One throwaway PostgreSQL server for the whole test session (fails if unavailable)."""
    server = start_postgres()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def postgres_url(pg_server: PgServer) -> str:
    """A fresh database per test, so tests never see each other's runs."""
    name = pg_server.create_database(f"t_{uuid.uuid4().hex[:12]}")
    return pg_server.url(name)
