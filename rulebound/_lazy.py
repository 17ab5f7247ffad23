"""Names a package exports but imports on first use (PEP 562 `__getattr__`).

A command or a program pays only for what it touches: the CLI's `--help` loads no engine,
a program using the scripted model loads no aiohttp.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def lazy_names(package: str, homes: Mapping[str, str]) -> Callable[[str], Any]:
    """A module `__getattr__` for `package`: each name of `homes` is loaded from its module
    (absolute, or relative to `package`) the first time it is asked for, then kept."""

    def __getattr__(name: str) -> Any:
        home = homes.get(name)
        if home is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(home, package), name)
        setattr(sys.modules[package], name, value)  # found once: later lookups skip this
        return value

    return __getattr__
