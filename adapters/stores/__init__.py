"""Event stores, chosen by URL: memory://, sqlite:///path.db, postgresql://user:pass@host/db."""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import parse_qs, unquote, urlsplit

from rulebound.engine.store import EventStore, StoreError

from rulebound._lazy import lazy_names

__all__ = ["MemoryStore", "SQLiteStore", "open_store", "redact"]


# The store classes, imported on first use (a command opens one kind of store).
__getattr__ = lazy_names(__name__, {"MemoryStore": ".memory", "SQLiteStore": ".sqlite"})


if TYPE_CHECKING:
    from .memory import MemoryStore
    from .sqlite import SQLiteStore


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return parts._replace(netloc=netloc).geturl()


def open_store(url: str) -> EventStore:
    """Open (and create if needed) the store a URL names."""
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise StoreError(f"invalid store URL {redact(url)!r}: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme == "memory":
        from .memory import MemoryStore

        return MemoryStore()
    if scheme == "sqlite":
        if parts.netloc:
            raise StoreError(f"invalid SQLite URL {url!r}: use sqlite:///relative.db or "
                             "sqlite:////absolute/path.db")
        path = unquote(parts.path[1:] if parts.path.startswith("/") else parts.path)
        if not path:
            raise StoreError(f"invalid SQLite URL {url!r}: no file path")
        from .sqlite import SQLiteStore

        return SQLiteStore(path)
    if scheme in ("postgresql", "postgres"):
        from .postgres import PostgresStore

        options = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        return PostgresStore.from_url(url, **options)
    raise StoreError(f"unknown store URL scheme {scheme + '://' if scheme else ''!r} in "
                     f"{redact(url)!r}: use memory://, sqlite:///path.db or postgresql://...")
