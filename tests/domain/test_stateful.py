"""The stateful proof: random definitions, random outcomes, every invariant after every step.

A hypothesis RuleBasedStateMachine draws a valid workflow (chains, routers, loops with visit
limits, retries, parallel branches, maps, signal waits with timeouts, delays, tight budgets,
on_limit and failure paths) and drives one run of it through the real decider with random
executor outcomes, signals, time, cancellations and crashes. After every rule it checks:
replay equals the live state byte for byte, nothing follows the end, visit limits and
budgets hold, steps stay within max_steps, and re-deciding reproduces every decision. At
teardown it lets the run finish and checks it ended within its limits.

RULEBOUND_HYPOTHESIS_EXAMPLES sets the number of runs (default 200); each takes up to 50
steps.
"""

from __future__ import annotations

import os
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import event as hypothesis_event
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from pydantic import BaseModel

from domain import (
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
from domain import events as ev
from domain.errors import InvalidEvent
from engine.testing import HistoryChecker, InvariantViolated

EXAMPLES = int(os.environ.get("RULEBOUND_HYPOTHESIS_EXAMPLES", "200"))
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
    """A valid workflow of 2-6 top-level steps, built so that validation always passes."""
    n = draw(st.integers(2, 6))
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
            targets = [*later, END, FAIL] + (names[: i + 1] if loops else [])
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
                            on=draw(st.sampled_from([None, ("server_error", "timeout")]))),
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
                          retry=Retry(attempts=draw(st.integers(1, 2)), backoff=0.1),
                          cost=draw(st.sampled_from([0.0, 0.002]))),
                max_concurrency=draw(st.integers(1, 3)), max_items=draw(st.integers(2, 6)),
                on_item_failure=draw(st.sampled_from(["fail", "collect"])), **common))
    handoff = Step("handoff", executor="human", on_failure=FAIL, next=END)
    on_limit = draw(st.booleans())
    return Workflow(
        "random", steps=[*steps, handoff], on_failure="handoff",
        on_limit="handoff" if on_limit else None,
        limits=Limits(max_cost=draw(st.sampled_from([0.02, 0.1, 1.0])),
                      max_tokens=draw(st.sampled_from([300, 2000, 100_000])),
                      max_steps=draw(st.integers(3, 25)),
                      deadline=draw(st.sampled_from([60.0, 600.0, 600.0]))))


class RunMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.sim: Simulator | None = None
        self.checker: HistoryChecker | None = None

    @initialize(definition=workflows(), seed=st.integers(0, 2**31),
                items=st.lists(st.integers(0, 9), max_size=7))
    def start(self, definition: Workflow, seed: int, items: list[int]) -> None:
        self.sim = Simulator(definition, seed=seed)
        self.checker = HistoryChecker(definition)
        self.sim.start({"items": items})

    ACTIONS = ("succeed",) * 8 + ("fail",) * 3 + ("wait",) * 3 + ("long wait",) + (
        "signal",) * 2 + ("crash",) + ("late fact",)

    @rule(data=st.data(), action=st.sampled_from(ACTIONS), rare=st.integers(0, 499))
    def act(self, data: st.DataObject, action: str, rare: int) -> None:
        """One step of the world: whatever the drawn action is, it applies to any state."""
        sim = self.sim
        assert sim is not None
        if sim.state.terminal:
            self._late_fact()
            return
        if rare == 0:
            sim.cancel("cancelled by the test")
            return
        for key in sim.ready():  # the engine starts whatever is due at once
            sim.start_attempt(key)
        running = sim.running()
        if action in ("succeed", "fail") and running:
            key = data.draw(st.sampled_from(running), label="attempt")
            grant = sim.state.steps[key]
            if action == "succeed":
                output = data.draw(OUTPUTS) if "_" not in grant.name else {"ok": True}
                tokens = data.draw(st.integers(0, grant.max_tokens or 0), label="tokens")
                cost = data.draw(st.floats(0, 1), label="cost share") * grant.max_cost
                sim.succeed(key, output, ev.Usage(tokens_out=tokens, cost=cost))
            else:
                kind = data.draw(st.sampled_from(KINDS), label="error kind")
                after = data.draw(st.none() | st.floats(0, 20), label="retry after")
                sim.fail(key, kind, retryable=kind != "client_error",
                         usage=ev.Usage(cost=grant.max_cost / 2), retry_after=after)
        elif action == "signal":
            name = data.draw(st.sampled_from(["approve", "more", "unrelated"]), label="signal")
            sim.signal(name, {"ok": data.draw(st.booleans(), label="ok")})
        elif action == "crash":
            sim.crash()
        elif action == "long wait":
            sim.advance_time(data.draw(st.sampled_from([30.0, 120.0]), label="seconds"))
        else:
            sim.advance_time(data.draw(st.sampled_from([0.05, 0.5, 2.0, 6.0]), label="seconds"))

    def _late_fact(self) -> None:
        """A finished run refuses every new fact and its log stays as it was."""
        sim = self.sim
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
            self.checker.feed(self.sim.history, self.sim.state)

    def teardown(self) -> None:
        if self.sim is None:
            return
        sim = self.sim
        limits = sim.definition.limits
        sim.run_to_end({}, max_rounds=20_000)
        if not sim.state.terminal:
            sim.advance_time(limits.deadline + 1)
        if not sim.state.terminal:
            raise InvariantViolated("the run did not end within its limits")
        self.checker.feed(sim.history, sim.state)
        hypothesis_event(f"ended {sim.state.status} ({sim.state.error_type or 'ok'})")
        hypothesis_event(f"events: {10 * (len(sim.history) // 10)}+")
        assert sim.state.steps_taken <= limits.max_steps
        assert sim.state.cost <= limits.max_cost + 1e-9


RunMachine.TestCase.settings = settings(
    max_examples=EXAMPLES, stateful_step_count=50, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                           HealthCheck.data_too_large])
test_random_runs_keep_every_invariant = RunMachine.TestCase
