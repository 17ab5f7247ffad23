"""The engine's only source of time, injected so tests and replays control it."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Protocol


class Clock(Protocol):
    def now(self) -> datetime:
        """Wall-clock time (UTC) stamped on events."""

    def monotonic(self) -> float:
        """Seconds for measuring latencies and timeouts; never goes backwards."""


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)

    def monotonic(self) -> float:
        return time.monotonic()
