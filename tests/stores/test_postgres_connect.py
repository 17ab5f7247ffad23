"""An unreachable PostgreSQL is a one-line StoreError within seconds naming host:port and why."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest
from rulebound.adapters.stores import open_store
from rulebound.engine.store import StoreError

from tests.pgserver import PgServer


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts TCP connections and never says a word (a stuck server)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield int(listener.getsockname()[1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again: nothing listens there


def test_a_refused_connection_names_address_and_cause_at_once() -> None:
    port = free_port()
    began = time.monotonic()
    with pytest.raises(StoreError) as caught:
        open_store(f"postgresql://me:hunter2@127.0.0.1:{port}/db")
    assert time.monotonic() - began < 2
    assert str(caught.value) == (f"cannot reach PostgreSQL at 127.0.0.1:{port} (database 'db', "
                                 "user 'me'): Connection refused")


def test_a_silent_server_times_out_after_connect_timeout(silent_port: int) -> None:
    began = time.monotonic()
    with pytest.raises(StoreError, match=rf"^cannot reach PostgreSQL at 127\.0\.0\.1:"
                                         rf"{silent_port} .*: connection timeout expired$"):
        open_store(f"postgresql://me:pw@127.0.0.1:{silent_port}/db?connect_timeout=2")
    assert 1.5 < time.monotonic() - began < 5


@pytest.mark.postgres
def test_a_wrong_password_names_the_cause_and_never_the_password(pg_server: PgServer) -> None:
    url = pg_server.url().replace(f":{pg_server.password}@", ":not-the-password@")
    with pytest.raises(StoreError) as caught:
        open_store(url)
    assert "password authentication failed for user \"rulebound\"" in str(caught.value)
    assert f"127.0.0.1:{pg_server.port}" in str(caught.value)
    assert "not-the-password" not in str(caught.value)
