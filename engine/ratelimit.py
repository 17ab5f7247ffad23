"""Per-executor rate limits: requests and tokens per window, delayed, never dropped.

A sliding-window log rather than a token or leaky bucket (such as aiolimiter's): a bucket
that starts full lets up to twice the rate through in some window, and a provider enforces
its limit per window. The engine admits an attempt when it claims it (so the start can be
written in the same transaction as the decision) but calls the executor only after that
write; an admitted request therefore holds its place in every window until its real call
time is known (`called`), which keeps the guarantee at the moment of the call.
"""

from __future__ import annotations

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


class Admission:
    """One admitted request: its call time (None until called) and its tokens."""

    __slots__ = ("at", "tokens")

    def __init__(self, tokens: int) -> None:
        self.at: float | None = None
        self.tokens = tokens


class SlidingWindow:
    """Admission control for one executor key; time is passed in (monotonic seconds)."""

    def __init__(self, limit: RateLimit) -> None:
        self.limit = limit
        self._live: list[Admission] = []

    def _expire(self, now: float) -> None:
        horizon = now - self.limit.per
        self._live = [a for a in self._live if a.at is None or a.at > horizon]

    def try_acquire(self, now: float, tokens: int = 0) -> tuple[float, Admission | None]:
        """Admit a request now (0.0 and its admission) or say how long to wait (and None)."""
        self._expire(now)
        limit = self.limit
        if limit.tokens is not None:
            tokens = min(tokens, limit.tokens)  # one request larger than the window still goes
        fits = (limit.requests is None or len(self._live) < limit.requests) and (
            limit.tokens is None or sum(a.tokens for a in self._live) + tokens <= limit.tokens)
        if fits:
            admission = Admission(tokens)
            self._live.append(admission)
            return 0.0, admission
        called = [a.at for a in self._live if a.at is not None]
        # The earliest moment a called request leaves the window; if every admitted request is
        # still on its way to being called, look again shortly.
        wait = min(called) + limit.per - now if called else 0.01
        return max(wait, 0.001), None

    def called(self, admission: Admission, now: float) -> None:
        admission.at = now

    def release(self, admission: Admission) -> None:
        """The admitted request was never made (cancelled, or its start was not written)."""
        if admission.at is None and admission in self._live:
            self._live.remove(admission)

    def settle(self, admission: Admission, used: int) -> None:
        """Count what the request really used instead of what it reserved."""
        admission.tokens = used
