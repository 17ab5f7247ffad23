"""Store faults on demand: test what a durable engine promises when its store misbehaves.

`FaultyStore` wraps any EventStore (memory, SQLite, PostgreSQL, your own) and is itself
one, so it goes wherever a store does, e.g. `Engine(store=FaultyStore(open_store(url)))`:

    store = FaultyStore(open_store("sqlite:///t.db"), seed=7, lost_ack_rate=0.05)
    store.fail_next(2)                 # the next 2 appends raise StoreUnavailable, unwritten
    store.lose_acks(1)                 # the next append lands, then raises (lost ack)
    store.lose_acks(1, error="conflict")  # ... raises ConcurrencyConflict, as a recorder
                                       #     retrying into its own rows would
    store.outage(2.0)                  # every call raises StoreUnavailable for 2 seconds
    store.slow(0.05)                   # every call takes 50 ms longer (slow(0) to stop)
    store.hold()                       # appends wait in their thread until store.release()
    store.heal()                       # scripted faults, delays, outage and holds end

Injected errors are the port's own (`StoreUnavailable`, `ConcurrencyConflict`), so the
code under test cannot tell them from real ones; their messages start with "injected".
Random faults are drawn from a seeded RNG: the seed is announced once (stderr by default)
and kept in `seed`, so a failing randomized test names how to reproduce its faults (the
same sequence of calls meets the same faults; threads may order calls differently).
`injected` counts what was done, `calls` counts calls per method.

`blocking` is the wrapped store's (an in-memory store stays inline on the loop) unless
given: a delay or a hold on an inline store stalls the loop, as a slow inline store would;
pass `blocking=True` to have the engine call it from its store threads instead. `hold`
refuses an inline store for that reason.
"""

from __future__ import annotations

import random
import secrets
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, Literal
from uuid import UUID

from .store import (
    ConcurrencyConflict,
    EventStore,
    Fence,
    Notification,
    Record,
    RunChange,
    RunRow,
    Snapshot,
    StoreError,
    StoreUnavailable,
)

METHODS = ("append", "read", "read_all", "last_position", "apply_run_changes",
           "run_changes_position", "list_runs", "count_runs", "delete_runs", "read_snapshot",
           "write_snapshot", "lease_cycle", "wait_for_change", "rate_claim", "park", "unpark",
           "wake_parked", "parked_due", "runs_to_recover")
LostAck = Literal["unavailable", "conflict"]


def _announce(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class FaultyStore:
    """An EventStore that injects faults into the calls it passes to `inner`.

    Random faults (each drawn per call from the seeded RNG; all default off):
      lost_ack_rate   share of appends that land and then raise (half StoreUnavailable,
                      half ConcurrencyConflict), as a lost acknowledgement would.
      fail_rate       share of calls (of `methods`) refused with StoreUnavailable before
                      they reach the store.
      outage_rate     share of calls (of `methods`) that start an outage of
                      `outage_seconds`, refusing every call until it ends.
      delay           seconds added to every call of `methods`, or (low, high) drawn
                      uniformly per call.
    `clock` and `sleep` are injectable (monotonic seconds) for tests of the wrapper itself.
    """

    def __init__(
        self,
        inner: EventStore,
        *,
        seed: int | None = None,
        lost_ack_rate: float = 0.0,
        fail_rate: float = 0.0,
        outage_rate: float = 0.0,
        outage_seconds: float = 2.0,
        delay: float | tuple[float, float] = 0.0,
        methods: Collection[str] = METHODS,
        blocking: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        announce: Callable[[str], None] | None = _announce,
    ) -> None:
        unknown = set(methods) - set(METHODS)
        if unknown:
            raise ValueError(f"unknown store methods {sorted(unknown)}; known: {list(METHODS)}")
        for name, rate in (("lost_ack_rate", lost_ack_rate), ("fail_rate", fail_rate),
                           ("outage_rate", outage_rate)):
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, got {rate}")
        low, high = delay if isinstance(delay, tuple) else (delay, delay)
        if not 0.0 <= low <= high:
            raise ValueError(f"delay must be seconds >= 0 (or low <= high), got {delay}")
        if outage_seconds < 0:
            raise ValueError(f"outage_seconds must be >= 0, got {outage_seconds}")
        self.inner = inner
        self.seed = secrets.randbits(32) if seed is None else seed
        self.lost_ack_rate = lost_ack_rate
        self.fail_rate = fail_rate
        self.outage_rate = outage_rate
        self.outage_seconds = outage_seconds
        self.delay = (low, high)
        self.methods = frozenset(methods)
        self.injected: Counter[str] = Counter()
        self.calls: Counter[str] = Counter()
        self._blocking = blocking
        self._clock = clock
        self._sleep = sleep
        self._rng = random.Random(self.seed)
        self._lock = threading.Lock()
        self._fail: dict[str, list[Callable[[], BaseException]]] = {}
        self._lost: list[LostAck] = []
        self._lost_cycles = 0
        self._slow: dict[str | None, float] = {}
        self._outage_until = float("-inf")
        self._held: set[str] = set()
        self._open_gate = threading.Condition(self._lock)
        self._waiting = 0
        if announce is not None and (lost_ack_rate or fail_rate or outage_rate or high):
            announce(f"FaultyStore seed={self.seed} (lost_ack_rate={lost_ack_rate}, "
                     f"fail_rate={fail_rate}, outage_rate={outage_rate}, delay={delay})")

    def __repr__(self) -> str:
        return f"FaultyStore({type(self.inner).__name__}, seed={self.seed})"

    @property
    def blocking(self) -> bool:
        if self._blocking is not None:
            return self._blocking
        return bool(getattr(self.inner, "blocking", True))

    # --- scripted faults --------------------------------------------------------------

    def fail_next(self, n: int = 1, *, method: str = "append",
                  error: Callable[[], BaseException] | None = None) -> None:
        """The next `n` calls of `method` raise before reaching the store: StoreUnavailable,
        or `error()` (e.g. `error=lambda: StoreError("disk full")`)."""
        self._check_method(method)
        make = error or (lambda: StoreUnavailable(
            f"injected fault: {method} refused (connection reset)", 0.05))
        with self._lock:
            self._fail.setdefault(method, []).extend([make] * n)

    def lose_acks(self, n: int = 1, *, error: LostAck = "unavailable",
                  method: str = "append") -> None:
        """The next `n` appends are written, then raise as if the acknowledgement was lost:
        StoreUnavailable, or ConcurrencyConflict (a recorder retrying into its own rows).
        With `method="lease_cycle"`: the next `n` lease cycles are done, then raise
        StoreUnavailable (the engine does not learn what they took)."""
        if error not in ("unavailable", "conflict"):
            raise ValueError(f"error must be 'unavailable' or 'conflict', got {error!r}")
        if method not in ("append", "lease_cycle"):
            raise ValueError(f"lost acknowledgements are for append or lease_cycle, not "
                             f"{method!r}")
        if method == "lease_cycle" and error != "unavailable":
            raise ValueError("a lease cycle's lost acknowledgement is 'unavailable'")
        with self._lock:
            if method == "append":
                self._lost.extend([error] * n)
            else:
                self._lost_cycles += n

    def outage(self, seconds: float) -> float:
        """Refuse every call with StoreUnavailable for `seconds` from now; returns the
        clock time it ends. A second outage extends, never shortens, the current one."""
        with self._lock:
            self._outage_until = max(self._outage_until, self._clock() + seconds)
            self.injected["outage"] += 1
            return self._outage_until

    def slow(self, seconds: float, *, method: str | None = None) -> None:
        """Every call (of `method`, or of any method) takes `seconds` longer; 0 stops."""
        if method is not None:
            self._check_method(method)
        with self._lock:
            if seconds > 0:
                self._slow[method] = seconds
            else:
                self._slow.pop(method, None)

    def hold(self, method: str = "append") -> None:
        """Calls of `method` wait in their thread, before reaching the store, until
        `release()`: a write in flight, e.g. to cancel its caller meanwhile."""
        self._check_method(method)
        if not self.blocking:
            raise StoreError("cannot hold calls to an inline (blocking = False) store: it "
                             "would stall the event loop; wrap it with blocking=True")
        with self._lock:
            self._held.add(method)

    def release(self) -> None:
        """Let held calls go on (and stop holding new ones)."""
        with self._lock:
            self._held.clear()
            self._open_gate.notify_all()

    def wait_held(self, count: int = 1, timeout: float = 5.0) -> bool:
        """Block until `count` calls are waiting in a hold (False on timeout)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._waiting < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._open_gate.wait(left)
            return True

    def heal(self) -> None:
        """End the outage, scripted failures, lost acks, delays and holds. The random rates
        stay as they are (set them to 0 to stop)."""
        with self._lock:
            self._fail.clear()
            self._lost.clear()
            self._lost_cycles = 0
            self._slow.clear()
            self._outage_until = float("-inf")
            self._held.clear()
            self._open_gate.notify_all()

    @property
    def outage_active(self) -> bool:
        with self._lock:
            return self._clock() < self._outage_until

    # --- the port -----------------------------------------------------------------------

    def append(self, records: Sequence[Record], fence: Fence | None = None) -> None:
        self._before("append")
        if fence is None:
            self.inner.append(records)
        else:
            self.inner.append(records, fence=fence)  # type: ignore[call-arg]
        with self._lock:
            lost: LostAck | None = self._lost.pop(0) if self._lost else None
            if lost is None and self.lost_ack_rate and self._rng.random() < self.lost_ack_rate:
                lost = "conflict" if self._rng.random() < 0.5 else "unavailable"
            if lost is not None:
                self.injected["lost_ack"] += 1
        if lost == "conflict":
            raise ConcurrencyConflict(
                "injected fault: lost acknowledgement, retried into its own rows",
                sorted({r.run_id for r in records}, key=str))
        if lost == "unavailable":
            raise StoreUnavailable("injected fault: connection lost after commit "
                                   "(acknowledgement lost)", 0.05)

    def read(self, run_id: UUID, after: int = 0) -> list[Record]:
        self._before("read")
        return self.inner.read(run_id, after)

    def read_all(self, after: int, limit: int, *, topics: Sequence[str] = (),
                 stop: int | None = None) -> list[Notification]:
        self._before("read_all")
        return self.inner.read_all(after, limit, topics=topics, stop=stop)

    def last_position(self) -> int:
        self._before("last_position")
        return self.inner.last_position()

    def apply_run_changes(self, changes: Sequence[RunChange], position: int) -> None:
        self._before("apply_run_changes")
        self.inner.apply_run_changes(changes, position)

    def run_changes_position(self) -> int:
        self._before("run_changes_position")
        return self.inner.run_changes_position()

    def list_runs(self, *, status: str | None = None, workflow: str | None = None,
                  limit: int = 100, offset: int = 0) -> list[RunRow]:
        self._before("list_runs")
        return self.inner.list_runs(status=status, workflow=workflow, limit=limit,
                                    offset=offset)

    def count_runs(self) -> dict[str, int]:
        self._before("count_runs")
        return self.inner.count_runs()

    # A store that leases shards to many engines (PostgreSQL) keeps doing so through the
    # wrapper, faults included: an outage stops lease renewals as it would for real.

    @property
    def shards(self) -> int | None:
        return getattr(self.inner, "shards", None)

    def lease_cycle(self, *args: Any, **kwargs: Any) -> Any:
        self._before("lease_cycle")
        state = self.inner.lease_cycle(*args, **kwargs)  # type: ignore[attr-defined]
        with self._lock:
            lost = self._lost_cycles > 0
            if lost:
                self._lost_cycles -= 1
                self.injected["lost_ack"] += 1
        if lost:
            raise StoreUnavailable("injected fault: connection lost after the lease cycle "
                                   "committed (acknowledgement lost)", 0.05)
        return state

    def park(self, run_id: UUID, until: float, version: int | None = None) -> None:
        self._before("park")
        self.inner.park(run_id, until, version)  # type: ignore[attr-defined]

    def unpark(self, run_id: UUID, fence: Fence | None = None) -> None:
        self._before("unpark")
        if fence is None:
            self.inner.unpark(run_id)  # type: ignore[attr-defined]
        else:
            self.inner.unpark(run_id, fence)  # type: ignore[attr-defined]

    def wake_parked(self, run_id: UUID, now: float) -> None:
        self._before("wake_parked")
        self.inner.wake_parked(run_id, now)  # type: ignore[attr-defined]

    def parked_due(self, until: float, limit: int = 1000) -> list[UUID]:
        self._before("parked_due")
        return list(self.inner.parked_due(until, limit))  # type: ignore[attr-defined]

    def runs_to_recover(self, now: float, limit: int = 500, offset: int = 0) -> list[UUID]:
        self._before("runs_to_recover")
        return list(self.inner.runs_to_recover(now, limit, offset))  # type: ignore[attr-defined]

    def rate_claim(self, *args: Any, **kwargs: Any) -> float:
        self._before("rate_claim")
        return float(self.inner.rate_claim(*args, **kwargs))  # type: ignore[attr-defined]

    def wait_for_change(self, timeout: float) -> bool:
        self._before("wait_for_change")
        return bool(self.inner.wait_for_change(timeout))  # type: ignore[attr-defined]

    def claim_writer(self, worker: str) -> None:
        claim = getattr(self.inner, "claim_writer", None)
        if claim is not None:
            claim(worker)

    def delete_runs(self, runs: Mapping[UUID, int]) -> list[UUID]:
        self._before("delete_runs")
        return self.inner.delete_runs(runs)

    def read_snapshot(self, run_id: UUID) -> Snapshot | None:
        self._before("read_snapshot")
        reader = getattr(self.inner, "read_snapshot", None)
        return reader(run_id) if reader is not None else None

    def write_snapshot(self, snapshot: Snapshot) -> None:
        self._before("write_snapshot")
        writer = getattr(self.inner, "write_snapshot", None)
        if writer is not None:
            writer(snapshot)

    def close(self) -> None:
        """Never faulted; releases any held call first."""
        self.release()
        self.inner.close()

    # --- plumbing -----------------------------------------------------------------------

    def _check_method(self, method: str) -> None:
        if method not in METHODS:
            raise ValueError(f"unknown store method {method!r}; known: {list(METHODS)}")

    def _before(self, method: str) -> None:
        """Count the call, then hold, delay, and refuse it if a fault says so."""
        pause = 0.0
        error: BaseException | None = None
        with self._lock:
            self.calls[method] += 1
            if method in self._held:
                self.injected["held"] += 1
                self._waiting += 1
                self._open_gate.notify_all()
                while method in self._held:
                    self._open_gate.wait()
                self._waiting -= 1
            randomized = method in self.methods
            pause = self._slow.get(method, self._slow.get(None, 0.0))
            low, high = self.delay
            if randomized and high:
                pause += low if low == high else self._rng.uniform(low, high)
            now = self._clock()
            if randomized and self.outage_rate and self._rng.random() < self.outage_rate:
                self._outage_until = max(self._outage_until, now + self.outage_seconds)
                self.injected["outage"] += 1
            if now < self._outage_until:
                self.injected["refused_in_outage"] += 1
                left = self._outage_until - now
                error = StoreUnavailable(
                    f"injected fault: store unreachable (outage, {left:.2f}s left)", left)
            elif self._fail.get(method):
                self.injected["failed"] += 1
                error = self._fail[method].pop(0)()
            elif randomized and self.fail_rate and self._rng.random() < self.fail_rate:
                self.injected["failed"] += 1
                error = StoreUnavailable(f"injected fault: {method} refused (connection "
                                         "reset)", 0.05)
            if pause:
                self.injected["delayed"] += 1
        if pause:
            self._sleep(pause)
        if error is not None:
            raise error


__all__ = ["METHODS", "FaultyStore", "LostAck"]
