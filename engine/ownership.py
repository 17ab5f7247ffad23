"""Ownership: which runs this engine decides for, when several engines share one store.

Runs are owned by shard (the run id modulo the store's shard count). Each shard is leased to
one engine at a time, with an epoch that grows at every takeover; leases are kept in the
store and timed by its clock (see the PostgreSQL adapter's `lease_cycle`). Every append an
owner makes carries a `Fence` (its shards at their epochs) that the store checks inside the
write's own transaction, so a paused or partitioned former owner can never write a decision
after another engine took its shard.

An engine that cannot renew its leases stops deciding for their runs before they can expire
(self-fencing): at `fence_after` of the lease time without a successful renewal it gives up
every shard here, cancels the attempts it runs, and takes shards again only through a
successful cycle (each taken at a new epoch).

A store without leases (memory, SQLite: one engine per store) needs none of this: with no
`Ownership`, an engine owns every run.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from uuid import UUID

from .store import Fence, LeaseState


class Ownership:
    """The shards this engine holds now, at their epochs; nothing here does I/O."""

    def __init__(self, worker: str, shards: int, lease_seconds: float, *,
                 fence_after: float = 0.6,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if lease_seconds <= 0:
            raise ValueError("lease_seconds must be positive")
        self.worker = worker
        self.shards = shards
        self.lease_seconds = lease_seconds
        self.fence_after = fence_after * lease_seconds
        self.held: dict[int, int] = {}  # shard -> epoch
        self.wanted: frozenset[int] = frozenset()
        self.engines = 0
        self.renewals = 0
        self.takeovers = 0  # shards taken (at a new epoch) by this engine
        self.self_fenced = 0  # times this engine gave up everything for want of renewal
        self._clock = clock
        self._renewed_at = clock()

    def shard(self, run_id: UUID) -> int:
        return run_id.int % self.shards

    def owns(self, run_id: UUID) -> bool:
        return run_id.int % self.shards in self.held

    def fence(self, run_id: UUID) -> Fence:
        shard = run_id.int % self.shards
        return Fence(self.worker, ((shard, self.held[shard]),))

    def apply(self, state: LeaseState) -> tuple[set[int], set[int]]:
        """A lease cycle succeeded: hold what it says. Returns (gained, lost) shards."""
        gained = {s for s in state.held if self.held.get(s) != state.held[s]}
        lost = {s for s in self.held if state.held.get(s) != self.held[s]}
        self.held = dict(state.held)
        self.wanted = state.wanted
        self.engines = state.engines
        self.renewals += 1
        self.takeovers += len(gained)
        self._renewed_at = self._clock()
        return gained, lost

    def overdue(self) -> bool:
        """No renewal for long enough that the leases may soon expire elsewhere."""
        return bool(self.held) and self._clock() - self._renewed_at > self.fence_after

    def give_up(self, shards: set[int] | None = None) -> set[int]:
        """Stop holding `shards` (all when None) here; returns those given up."""
        lost = set(self.held) if shards is None else shards & set(self.held)
        for shard in lost:
            del self.held[shard]
        return lost

    def surplus(self) -> set[int]:
        """Shards held that another engine should hold now (engines joined): hand them over."""
        return set(self.held) - self.wanted
