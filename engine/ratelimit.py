"""Per-executor rate limits: requests and tokens per minute, delayed, never dropped.

A sliding-window log rather than a token or leaky bucket (such as aiolimiter's): a bucket
that starts full lets up to twice the rate through in some 60-second window, and a limit a
provider enforces per window must hold in every window. The log keeps one entry per
admitted request; memory is bounded by the limit itself.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RateLimit:
    """At most `requests` requests and `tokens` tokens in any `per`-second window."""

    requests: int | None = None
    tokens: int | None = None
    per: float = 60.0

    def __post_init__(self) -> None:
        if self.requests is not None and self.requests < 1:
            raise ValueError("RateLimit.requests must be at least 1")
        if self.tokens is not None and self.tokens < 1:
            raise ValueError("RateLimit.tokens must be at least 1")
        if not self.per > 0:
            raise ValueError("RateLimit.per must be positive")


class SlidingWindow:
    """Admission control for one executor key; time is passed in (monotonic seconds)."""

    def __init__(self, limit: RateLimit) -> None:
        self.limit = limit
        self._log: deque[tuple[float, int]] = deque()
        self._tokens = 0

    def _expire(self, now: float) -> None:
        horizon = now - self.limit.per
        while self._log and self._log[0][0] <= horizon:
            _, tokens = self._log.popleft()
            self._tokens -= tokens

    def try_acquire(self, now: float, tokens: int = 0) -> float:
        """Admit one request costing `tokens` now (returns 0.0) or say how long to wait."""
        self._expire(now)
        limit = self.limit
        if limit.tokens is not None and tokens > limit.tokens:
            tokens = limit.tokens  # a single request larger than the window still gets through
        wait = 0.0
        if limit.requests is not None and len(self._log) >= limit.requests:
            wait = self._log[len(self._log) - limit.requests][0] + limit.per - now
        if limit.tokens is not None and self._tokens + tokens > limit.tokens:
            excess = self._tokens + tokens - limit.tokens
            freed = 0
            for at, used in self._log:
                freed += used
                if freed >= excess:
                    wait = max(wait, at + limit.per - now)
                    break
        if wait > 0:
            return wait + 1e-6
        self._log.append((now, tokens))
        self._tokens += tokens
        return 0.0

    def settle(self, reserved: int, used: int) -> None:
        """Replace a request's reserved tokens by what it really used (the newest match)."""
        if reserved == used:
            return
        for i in range(len(self._log) - 1, -1, -1):
            at, tokens = self._log[i]
            if tokens == reserved:
                self._log[i] = (at, used)
                self._tokens += used - reserved
                return
