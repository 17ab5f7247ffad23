"""Shared fixtures: stores by URL (real SQLite files and a throwaway PostgreSQL, no mocks)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(params=["memory", "sqlite"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Engine tests run on the in-memory store and on a real SQLite file."""
    if request.param == "memory":
        return "memory://"
    return f"sqlite:///{tmp_path / 'runs.db'}"


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'runs.db'}"
