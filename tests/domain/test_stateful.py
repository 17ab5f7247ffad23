"""The stateful proof: random definitions, random outcomes, every invariant after every step.

A hypothesis RuleBasedStateMachine draws a valid workflow (chains, routers, loops with visit
limits, retries, parallel branches, maps, signal waits with timeouts, delays, tight budgets,
on_limit and failure paths) and drives a run of it through the real decider with random
executor outcomes, signals, time, cancellations and crashes. When that run ends, the same
example checks that it refuses new facts and starts a new run of a newly drawn workflow, so
every step of the example drives a live run. After every step it checks: replay equals the
live state byte for byte, nothing follows the end, visit limits and budgets hold, steps stay
within max_steps, and re-deciding reproduces every decision. At teardown it lets the last run
finish and checks it ended within its limits.

Time moves on the definition's own scale: attempts take a share of their timeout, a timed-out
attempt takes all of it, and waits go part of the way or exactly up to the next thing due
(a backoff, a durable delay, a signal timeout, the deadline). Cancellation is rare.

The test then checks a floor on what it explored (the steps drive live runs, runs last
several steps, a good share complete through executor outcomes, few are cancelled), so a
change that makes the exploration shallow fails instead of passing on paper. Run it with
`--hypothesis-show-statistics` to see the distribution (and `-s` for the summary figures).

RULEBOUND_HYPOTHESIS_EXAMPLES sets the number of examples (default 200); each takes up to 50
steps (hypothesis ends a few earlier).
"""

from __future__ import annotations

import os
import statistics
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from datetime import timedelta
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import event as hypothesis_event
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)
from pydantic import BaseModel
from rulebound.domain import (
    END,
    FAIL,
    Limits,
    Map,
    Parallel,
    Retry,
    Route,
    Simulator,
    Step,
    WaitForSignal,
    Workflow,
    field,
)
from rulebound.domain import events as ev
from rulebound.domain.decider import dispatchable, timers
from rulebound.domain.errors import InvalidEvent
from rulebound.engine.testing import HistoryChecker, InvariantViolated

EXAMPLES = int(os.environ.get("RULEBOUND_HYPOTHESIS_EXAMPLES", "200"))
STEPS = 50
KINDS = ("server_error", "rate_limited", "timeout", "invalid_output", "client_error")


class Out(BaseModel):
    label: str
    score: int
    again: bool


OUTPUTS = st.builds(lambda label, score, again: {"label": label, "score": score,
                                                 "again": again},
                    st.sampled_from(["a", "b", "c"]), st.integers(0, 10), st.booleans())
LABELS = st.sampled_from(["a", "b", "c"])


@st.composite
def workflows(draw: st.DrawFn) -> Workflow:
    """A valid workflow of 2-8 top-level steps, built so that validation always passes."""
    # The larger of two draws: most runs get a few steps to go through, and a failing
    # example still shrinks to two.
    n = max(draw(st.integers(2, 8)), draw(st.integers(2, 8)))
    names = [f"s{i}" for i in range(n)]
    loops = draw(st.booleans())
    steps: list[Any] = []
    for i, name in enumerate(names):
        later = names[i + 1:]
        kind = draw(st.sampled_from(["task", "task", "task", "signal", "parallel", "map"]))
        common: dict[str, Any] = {
            "next": names[i + 1] if i + 1 < n else END,
            "max_visits": draw(st.integers(1, 3)) if loops else None,
        }
        if i + 1 < n and draw(st.booleans()):  # the last one uses the workflow's path
            common["on_failure"] = draw(st.sampled_from([FAIL, END, *later]))
        if kind == "task":
            # Later steps twice, so runs tend to go on rather than stop at the first route.
            targets = [*later, *later, END, FAIL] + (names[: i + 1] if loops else [])
            routes = [Route(draw(st.sampled_from(targets)),
                            when=draw(st.sampled_from([
                                field(f"{name}.label") == draw(LABELS),
                                field(f"{name}.score") > draw(st.integers(0, 10)),
                                field(f"{name}.again").is_true()])))
                      for _ in range(draw(st.integers(0, 2)))]
            steps.append(Step(
                name, executor="llm", output=Out, routes=routes,
                timeout=draw(st.sampled_from([1.0, 5.0, 30.0])),
                retry=Retry(attempts=draw(st.integers(1, 4)),
                            backoff=draw(st.sampled_from([0.0, 0.5, 2.0])),
                            jitter=draw(st.sampled_from([0.0, 0.2])),
                            on=draw(st.sampled_from([None, ("server_error", "timeout")])),
                            max_abandoned=draw(st.sampled_from([None, None, 0, 1]))),
                cost=draw(st.sampled_from([0.0, 0.001, 0.01, 0.05])),
                max_tokens=draw(st.sampled_from([None, 50, 400])),
                delay=draw(st.sampled_from([None, None, 3.0])), **common))
        elif kind == "signal":
            steps.append(WaitForSignal(
                name, signal=draw(st.sampled_from(["approve", "more"])),
                timeout=draw(st.sampled_from([5.0, 60.0])),
                on_timeout=draw(st.sampled_from([None, *later])), **common))
        elif kind == "parallel":
            branches = [Step(f"{name}_b{j}", executor="tool",
                             timeout=draw(st.sampled_from([1.0, 5.0, 30.0])),
                             retry=Retry(attempts=draw(st.integers(1, 3)), backoff=0.1),
                             cost=draw(st.sampled_from([0.0, 0.01])))
                        for j in range(draw(st.integers(1, 3)))]
            steps.append(Parallel(name, branches=branches,
                                  on_branch_failure=draw(st.sampled_from(["fail", "collect"])),
                                  **common))
        else:
            steps.append(Map(
                name, over="input.items",
                step=Step(f"{name}_item", executor="tool", input={"x": "item", "i": "index"},
                          timeout=draw(st.sampled_from([1.0, 5.0, 30.0])),
                          retry=Retry(attempts=draw(st.integers(1, 2)), backoff=0.1),
                          cost=draw(st.sampled_from([0.0, 0.002]))),
                max_concurrency=draw(st.integers(1, 3)), max_items=draw(st.integers(2, 6)),
                on_item_failure=draw(st.sampled_from(["fail", "collect"])), **common))
    handoff = Step("handoff", executor="human", on_failure=FAIL, next=END, timeout=30.0)
    on_limit = draw(st.booleans())
    return Workflow(
        "random", steps=[*steps, handoff], on_failure="handoff",
        on_limit="handoff" if on_limit else None,
        limits=Limits(max_cost=draw(st.sampled_from([0.02, 0.1, 1.0])),
                      max_tokens=draw(st.sampled_from([300, 2000, 100_000])),
                      max_steps=draw(st.integers(3, 25)),
                      deadline=draw(st.sampled_from([60.0, 600.0, 600.0])),
                      max_abandoned=draw(st.sampled_from([0, 1, 3]))))


# What the world does in one step. sampled_from shrinks towards the first entry, so the
# benign "succeed" is the shrink target; cancellation is not in this list (see CANCEL).
ACTIONS = ("succeed",) * 8 + ("fail",) * 3 + ("wait",) * 2 + ("tick",) * 2 + (
    "signal",) * 2 + ("crash",)
# A run is cancelled when the step's `rare` draw, from st.integers(0, RARE_MAX), is one of
# CANCEL: about 1 step in 130. Never 0 (hypothesis favours and shrinks towards it) nor a
# bound (upweighted); hypothesis samples this range uniformly.
RARE_MAX = 255
CANCEL = (101, 202)
LATENCY_SHARES = (0.0, 0.02, 0.1, 0.5)  # of the attempt's timeout, for a success or a failure
WAIT_SHARES = (0.25, 0.5, 0.9)  # of the time left before the next thing is due


@dataclass
class Exploration:
    """What the machine explored in one test session; the floor is checked on it."""

    examples: int = 0
    steps: int = 0  # act() calls
    live_steps: int = 0  # ... that acted on a run that had not ended
    runs: list[tuple[int, str, int, bool]] = dataclass_field(default_factory=list)
    # per run: (steps it was driven, end status or error type, events, ended while driven)

    def record(self, steps: int, state: Any, events: int, live: bool) -> None:
        end = state.status if state.status != "failed" else f"failed ({state.error_type})"
        self.runs.append((steps, end, events, live))

    def summary(self) -> dict[str, Any]:
        runs = self.runs
        ended = [r for r in runs if r[3]]

        def share(pred: Any, among: list[Any]) -> float:
            return sum(1 for r in among if pred(r)) / max(1, len(among))
        return {
            "examples": self.examples,
            "runs": len(runs),
            "live steps per example": self.live_steps / max(1, self.examples),
            "live step share": self.live_steps / max(1, self.steps),
            "mean steps per run": statistics.mean(r[0] for r in runs) if runs else 0.0,
            # The length of the run an average step drove (hypothesis' own zero-extended
            # examples make many two-step runs, which pull the plain mean down).
            "steps per run, per step": sum(r[0] ** 2 for r in runs) / max(1, sum(
                r[0] for r in runs)),
            "median events per run": statistics.median(r[2] for r in runs) if runs else 0,
            "completed while driven": share(lambda r: r[1] == "completed", runs),
            "cancelled": share(lambda r: r[1] == "cancelled", runs),
            "ended while driven": len(ended) / max(1, len(runs)),
        }


EXPLORED = Exploration()


def _seconds(delta: timedelta) -> float:
    return max(0.0, delta.total_seconds())


class RunMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.sim: Simulator | None = None
        self.checker: HistoryChecker | None = None
        self.run_steps = 0  # steps that drove the current run
        self.lengths: list[int] = []  # of this example's runs, in steps

    def _begin(self, definition: Workflow, seed: int, items: list[int]) -> None:
        self.sim = Simulator(definition, seed=seed)
        self.checker = HistoryChecker(definition)
        self.run_steps = 0
        self.sim.start({"items": items})

    @initialize(definition=workflows(), seed=st.integers(0, 2**31),
                items=st.lists(st.integers(0, 9), max_size=7))
    def start(self, definition: Workflow, seed: int, items: list[int]) -> None:
        EXPLORED.examples += 1
        self._begin(definition, seed, items)

    def _finish(self, *, live: bool) -> None:
        """Checks and bookkeeping for a run that ended (live: while the steps drove it)."""
        sim = self.sim
        assert sim is not None and self.checker is not None and sim.state.terminal
        self.checker.feed(sim.history, sim.state)
        limits = sim.definition.limits
        assert sim.state.steps_taken <= limits.max_steps
        assert sim.state.cost <= limits.max_cost + 1e-9
        self._late_fact()
        EXPLORED.record(self.run_steps, sim.state, len(sim.history), live)
        self.lengths.append(self.run_steps)
        status = EXPLORED.runs[-1][1]
        hypothesis_event(f"a run ended {status}" if live else f"the last run ran out: {status}")

    @rule(data=st.data(), action=st.sampled_from(ACTIONS), rare=st.integers(0, RARE_MAX))
    def act(self, data: st.DataObject, action: str, rare: int) -> None:
        """One step of the world: whatever the drawn action is, it applies to any state."""
        EXPLORED.steps += 1
        assert self.sim is not None
        if self.sim.state.terminal:  # a new run takes the ended one's place
            self._finish(live=True)
            self._begin(data.draw(workflows(), label="next workflow"),
                        data.draw(st.integers(0, 2**31), label="seed"),
                        data.draw(st.lists(st.integers(0, 9), max_size=7), label="items"))
        sim = self.sim
        assert sim is not None
        if sim.state.terminal:  # ended as it started (e.g. a budget too small for step one)
            return
        EXPLORED.live_steps += 1
        self.run_steps += 1
        if rare in CANCEL:
            sim.cancel("cancelled by the test")
            return
        self._dispatch()
        running = sim.running()
        if action in ("succeed", "fail") and running:
            key = data.draw(st.sampled_from(running), label="attempt")
            self._outcome(data, key, action)
        elif action == "succeed" and (awaited := self._awaited()):
            # Nothing is running but a step waits for a signal: the human answers.
            sim.signal(data.draw(st.sampled_from(awaited), label="answer"),
                       {"ok": data.draw(st.booleans(), label="ok")})
        elif action == "signal":
            name = data.draw(st.sampled_from(["approve", "more", "unrelated"]), label="signal")
            sim.signal(name, {"ok": data.draw(st.booleans(), label="ok")})
        elif action == "crash":
            sim.crash()
        elif action == "wait":
            share = data.draw(st.sampled_from(WAIT_SHARES), label="share of the wait")
            sim.advance_time(share * self._until_due())
        else:  # "tick", or nothing to succeed or fail: up to the next thing due
            self._tick(data)
        self._dispatch()

    def _tick(self, data: st.DataObject) -> None:
        """Time runs up to the next thing due; if that is a running attempt's timeout, the
        engine cancels the attempt and records it as timed out."""
        sim = self.sim
        assert sim is not None
        extra = data.draw(st.sampled_from([0.0, 0.001, 0.5]), label="past due")
        until = self._until_due()
        running = [(sim.state.steps[key].deadline, key) for key in sim.running()]
        first = min(((_seconds(d - sim.now), key) for d, key in running if d is not None),
                    default=None)
        if first is None or first[0] > until:
            sim.advance_time(until + extra)
            return
        seconds, key = first  # the first thing due is this attempt's timeout
        attempt = sim.state.steps[key].attempt
        sim.advance_time(seconds)
        grant = sim.state.steps[key]
        if not sim.state.terminal and grant.status == "running" and grant.attempt == attempt:
            sim.fail(key, "timeout", message="timed out", usage=ev.Usage(cost=grant.max_cost))

    def _dispatch(self) -> None:
        """The engine starts whatever is due at once."""
        sim = self.sim
        assert sim is not None
        for key in sim.ready():
            if sim.state.terminal:
                return
            sim.start_attempt(key)

    def _awaited(self) -> list[str]:
        sim = self.sim
        assert sim is not None
        return sorted({sim.definition.step(st.name).signal  # type: ignore[union-attr]
                       for st in sim.state.steps.values() if st.status == "waiting"})

    def _until_due(self) -> float:
        """Seconds until the next thing is due: a not-before time, a decider timer (a signal
        timeout, the deadline) or the timeout of a running attempt."""
        sim = self.sim
        assert sim is not None
        due = [st.not_before for st in dispatchable(sim.state)
               if st.not_before is not None and st.not_before > sim.now]
        due += [when for when, _ in timers(sim.definition, sim.state)]
        due += [sim.state.steps[key].deadline for key in sim.running()]
        return min((_seconds(when - sim.now) for when in due if when is not None),
                   default=0.0)

    def _outcome(self, data: st.DataObject, key: str, action: str) -> None:
        """The executor of attempt `key` reports, after taking its share of the timeout."""
        sim = self.sim
        assert sim is not None
        grant = sim.state.steps[key]
        task = sim.definition.task(grant.name)
        kind = "" if action == "succeed" else data.draw(st.sampled_from(KINDS), label="error kind")
        share = 1.0 if kind == "timeout" else data.draw(st.sampled_from(LATENCY_SHARES),
                                                        label="latency")
        attempt = grant.attempt
        sim.advance_time(share * task.timeout)
        grant = sim.state.steps[key]
        if sim.state.terminal or grant.status != "running" or grant.attempt != attempt:
            return  # the deadline (or a signal timeout's path) came first
        if action == "succeed":
            output = data.draw(OUTPUTS) if "_" not in grant.name else {"ok": True}
            tokens = data.draw(st.integers(0, grant.max_tokens or 0), label="tokens")
            cost = data.draw(st.floats(0, 1), label="cost share") * grant.max_cost
            sim.succeed(key, output, ev.Usage(tokens_out=tokens, cost=cost))
        else:
            after = data.draw(st.none() | st.sampled_from([0.0, 0.5, 5.0, 20.0]),
                              label="retry after")
            sim.fail(key, kind, retryable=kind != "client_error",
                     usage=ev.Usage(cost=grant.max_cost / 2), retry_after=after)

    def _late_fact(self) -> None:
        """A finished run refuses every new fact and its log stays as it was."""
        sim = self.sim
        assert sim is not None
        before = list(sim.history)
        for late in (lambda: sim.signal("approve", {}), lambda: sim.cancel("late")):
            try:
                late()
            except InvalidEvent:
                continue
            raise InvariantViolated("a finished run accepted a new fact")
        assert sim.history == before

    @invariant()
    def every_invariant_holds(self) -> None:
        if self.sim is not None:
            assert self.checker is not None
            self.checker.feed(self.sim.history, self.sim.state)

    def teardown(self) -> None:
        """The last run is let finish (it must, within its limits); then the example's
        shape goes to hypothesis' statistics."""
        sim = self.sim
        if sim is None:
            return
        if sim.state.terminal:
            self._finish(live=True)
        else:
            limits = sim.definition.limits
            sim.run_to_end({}, max_rounds=20_000)
            if not sim.state.terminal:
                sim.advance_time(limits.deadline + 1)
            if not sim.state.terminal:
                raise InvariantViolated("the run did not end within its limits")
            self._finish(live=False)
        runs = len(self.lengths)
        bucket = str(runs) if runs < 5 else "5-9" if runs < 10 else "10+"
        hypothesis_event(f"runs in the example: {bucket}")
        longest = max(self.lengths)
        hypothesis_event(f"longest run: {5 * (longest // 5)}+ steps")


SETTINGS = settings(
    max_examples=EXAMPLES, stateful_step_count=STEPS, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                           HealthCheck.data_too_large])
# The floor is only meaningful over enough runs; a quick local run with few examples skips it.
FLOOR_MIN_RUNS = 200


def test_random_runs_keep_every_invariant() -> None:
    global EXPLORED
    EXPLORED = Exploration()
    run_state_machine_as_test(RunMachine, settings=SETTINGS)
    seen = EXPLORED.summary()
    print(f"\nstateful exploration: {seen}")
    if seen["runs"] < FLOOR_MIN_RUNS:
        return
    # The floor: the steps drive live runs, the runs last several steps, most end through
    # what the executors report, and cancellation stays rare but is exercised. Each bound
    # leaves a wide margin from what the machine reaches (about 0.98 live, 8-9 steps per
    # run per step, 60-70% completed, 2-5% cancelled).
    assert seen["live step share"] >= 0.9, seen
    assert seen["steps per run, per step"] >= 6, seen
    assert seen["completed while driven"] >= 0.4, seen
    assert 0.002 <= seen["cancelled"] <= 0.1, seen


# Let hypothesis' pytest plugin report its statistics for this test, as for a @given test.
test_random_runs_keep_every_invariant.is_hypothesis_test = True  # type: ignore[attr-defined]


# --- abandoned attempts --------------------------------------------------------------------

CRASHY = ("crash",) * 3 + ("fail",) * 2 + ("permanent", "succeed", "wait")


@settings(max_examples=max(50, EXAMPLES // 2), deadline=None)
@given(attempts=st.integers(1, 4), on=st.sampled_from([None, ("server_error",)]),
       limit=st.integers(0, 3), own=st.none() | st.integers(0, 3),
       world=st.lists(st.sampled_from(CRASHY), max_size=40), seed=st.integers(0, 2**31))
def test_crashes_never_use_retries_are_capped_and_every_run_ends(
    attempts: int, on: tuple[str, ...] | None, limit: int, own: int | None,
    world: list[str], seed: int,
) -> None:
    """A world that crashes the engine at random around the executor's failures: whatever
    `Retry.on` says, no crash uses a retry, the visit fails as "abandoned" exactly on the
    crash after its cap, and the run ends (every attempt reported, plus the capped re-runs)."""
    wf = Workflow("crashy", on_failure=FAIL, limits=Limits(max_abandoned=limit), steps=[
        Step("s", executor="x", retry=Retry(attempts=attempts, on=on, max_abandoned=own))])
    cap = own if own is not None else limit
    sim = Simulator(wf, seed=seed)
    checker = HistoryChecker(wf)  # its invariants: retries and the cap, per event
    sim.start()
    crashes = failures = 0
    for action in world:
        if sim.state.terminal:
            break
        for key in sim.ready():
            sim.start_attempt(key)
        if not sim.running():
            sim.advance_time(120)  # past any backoff
            continue
        if action == "crash":
            crashes += 1
            sim.crash()
        elif action in ("fail", "permanent"):
            failures += 1
            sim.fail("s", "server_error", retryable=action == "fail")
        elif action == "succeed":
            sim.succeed("s", {})
        else:
            sim.advance_time(1)
        checker.feed(sim.history, sim.state)
    step = sim.state.steps["s"]
    assert step.abandoned == crashes and step.attempt <= attempts + cap + 1
    if crashes > cap:
        assert sim.state.status == "failed" and sim.state.error_type == "abandoned"
    elif sim.state.status == "failed":  # only what the executor reported failed the run
        assert sim.state.error_type == "server_error"
        last = next(e for e in reversed(sim.history) if isinstance(e, ev.AttemptFailed))
        assert failures == attempts or not last.retryable
    sim.run_to_end()
    assert sim.state.terminal
    checker.feed(sim.history, sim.state)
