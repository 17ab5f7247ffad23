"""Open a store from a URL through the `rulebound.stores` entry points.

The engine never imports an adapter by name: store implementations register themselves
under their URL scheme in pyproject.toml, and this module looks the scheme up.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from urllib.parse import urlsplit

from .store import EventStore, StoreError


def open_store(url: str) -> EventStore:
    scheme = urlsplit(url).scheme if "://" in url else ""
    if not scheme:
        raise StoreError("a store URL looks like memory://, sqlite:///path.db or "
                         "postgresql://user@host/db")
    found = [e for e in entry_points(group="rulebound.stores") if e.name == scheme]
    if not found:
        known = sorted({e.name for e in entry_points(group="rulebound.stores")})
        if not known:
            raise StoreError("no store implementations are registered: install rulebound "
                             "(pip install -e .) so its entry points exist")
        raise StoreError(f"no store for {scheme}:// URLs; use one of: "
                         + ", ".join(f"{k}://" for k in known))
    factory = found[0].load()
    return factory(url)
