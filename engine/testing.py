"""Property-test your own workflows before production.

    from rulebound.engine.testing import check_workflow
    check_workflow(triage, outputs={"classify": st.builds(Label)}, max_examples=300)

drives the definition through the real decider (via `domain.Simulator`) with
hypothesis-generated executor outcomes — schema-valid successes, retryable and permanent
failures, timeouts with Retry-After hints, signals, timers, cancellations, crashes followed by
recovery — and after every step checks the invariants rulebound promises:

- replaying the log, as the store would give it back (each event stamped into its stored
  bytes, hash-chained and decoded again), gives exactly the live state after every commit
  (canonical JSON, byte for byte);
- a finished run never changes again;
- no step is visited more often than its visit limit allows;
- no attempt is scheduled whose worst case would break the budget;
- an abandoned attempt (cut off by a crash) never uses one of the step's retries: a step
  fails of a retried error kind only after `Retry.attempts` reported attempts;
- abandoned attempts are re-run whatever `Retry.on` says, and at most `max_abandoned` times
  per visit: the step fails with "abandoned" exactly when one more is abandoned;
- the run ends within its limits;
- re-deciding the recorded history reproduces every recorded decision.

A failure is shrunk by hypothesis to a minimal sequence of outcomes and raised as
`InvariantViolated` naming the invariant. Needs `hypothesis` (a test dependency).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any
from uuid import UUID

import orjson
from rulebound.domain import events as ev
from rulebound.domain.decider import PERMANENT_ERRORS, decide
from rulebound.domain.definitions import Map, Parallel, Step, WaitForSignal, Workflow
from rulebound.domain.errors import RuleboundError
from rulebound.domain.simulator import Simulator
from rulebound.domain.state import RunState, evolve

from . import codec

_EPS = 1e-9


class InvariantViolated(RuleboundError, AssertionError):
    """A workflow broke one of rulebound's invariants under some sequence of outcomes."""


def canonical_state(state: RunState) -> bytes:
    return orjson.dumps(state.to_dict(), option=orjson.OPT_SORT_KEYS)


class HistoryChecker:
    """Checks a growing history against every invariant, each event and batch once.

    Feed it the events as they are appended (`feed`); it keeps the replayed state and the
    position of the last checked decision batch, so a long exploration stays linear.
    """

    def __init__(self, definition: Workflow) -> None:
        self.definition = definition
        self.state = RunState()
        self.seen = 0
        self.first_visits: dict[str, int] = {}
        self._batch_start: int | None = None
        self._batch_state: RunState | None = None
        self._history: list[ev.Event] = []
        self._prev_hash = codec.GENESIS_HASH
        # Per step key, in its current visit: attempts the executor reported on, attempts
        # abandoned (and re-run outside the retry budget), and how the last attempt ended.
        self._reported: dict[str, int] = {}
        self._abandoned: dict[str, int] = {}
        self._last_end: dict[str, ev.Event] = {}

    def feed(self, history: Sequence[ev.Event], live: RunState | None = None) -> None:
        limits = self.definition.limits
        for event in history[self.seen:]:
            index = len(self._history)
            if self.state.terminal:
                raise InvariantViolated(f"event {index + 1} ({event.type}) after the run ended")
            is_decision = event.type in ev.DECIDER_EVENTS
            if is_decision and self._batch_start is None:
                self._batch_start, self._batch_state = index, self.state
            elif not is_decision and self._batch_start is not None:
                self._check_batch(index)
            if isinstance(event, ev.StepScheduled):
                self._check_schedule(index, event)
            self._check_attempts(index, event)
            # Replay what a store would return, not the live objects: the live state was
            # folded from events built in memory (some without validation, for speed), the
            # replayed one from their stored bytes, decoded and validated.
            self._prev_hash, data = codec.stamp(event, UUID(int=index + 1), self._prev_hash)
            stored = codec.decode(data, seq=index + 1)
            if stored.body() != event.body():
                raise InvariantViolated(f"event {index + 1} ({event.type}) does not survive "
                                        "its stored form")
            self.state = evolve(self.state, stored)
            self._history.append(event)
            if self.state.steps_taken > limits.max_steps:
                raise InvariantViolated(f"event {index + 1}: {self.state.steps_taken} steps "
                                        f"taken, more than max_steps={limits.max_steps}")
        self.seen = len(history)
        if self._batch_start is not None:
            self._check_batch(len(self._history))
        if live is not None and canonical_state(self.state) != canonical_state(live):
            raise InvariantViolated("replaying the log does not give the live state")

    def _check_schedule(self, index: int, event: ev.StepScheduled) -> None:
        limits, state = self.definition.limits, self.state
        left_cost = limits.max_cost - state.cost - state.reserved_cost
        if event.max_cost > left_cost + _EPS:
            raise InvariantViolated(
                f"event {index + 1}: {event.step} scheduled with worst case "
                f"${event.max_cost:g} but only ${left_cost:g} was left")
        if event.max_tokens is not None:
            left_tokens = limits.max_tokens - state.tokens - state.reserved_tokens
            if event.max_tokens > left_tokens:
                raise InvariantViolated(
                    f"event {index + 1}: {event.step} may use {event.max_tokens} tokens "
                    f"but only {left_tokens} were left")
        if event.attempt == 1 and event.parent is None:
            visits = self.first_visits.get(event.step, 0) + 1
            self.first_visits[event.step] = visits
            if visits > self.definition.max_visits(event.step):
                raise InvariantViolated(
                    f"event {index + 1}: {event.step} visited {visits} times, more than its "
                    f"limit {self.definition.max_visits(event.step)}")

    def _cap(self, name: str) -> int:
        """The number of abandoned attempts a visit of task `name` re-runs."""
        own = self.definition.task(name).retry.max_abandoned
        return own if own is not None else int(self.state.limits["max_abandoned"])

    def _check_attempts(self, index: int, event: ev.Event) -> None:
        """Retries are used by reported failures only; abandoned attempts are capped."""
        step = getattr(event, "step", None)
        if step is None:
            return
        name = step.partition("[")[0]
        rerun = self.state.reruns_abandoned  # runs started before the rule: a failure
        if isinstance(event, ev.StepScheduled):
            if event.kind != "task":
                return
            if event.attempt == 1:
                self._reported[step] = self._abandoned[step] = 0
                self._last_end.pop(step, None)
                return
            last = self._last_end.get(step)
            if rerun and isinstance(last, ev.AttemptAbandoned):
                if self._abandoned[step] > self._cap(name):
                    raise InvariantViolated(
                        f"event {index + 1}: {step} re-run after {self._abandoned[step]} "
                        f"abandoned attempts, more than max_abandoned={self._cap(name)}")
            elif self._reported[step] >= self.definition.task(name).retry.attempts:
                raise InvariantViolated(
                    f"event {index + 1}: {step} retried after {self._reported[step]} "
                    f"reported attempts, its retry policy allows "
                    f"{self.definition.task(name).retry.attempts}")
        elif isinstance(event, ev.AttemptSucceeded | ev.AttemptFailed | ev.AttemptAbandoned):
            self._last_end[step] = event
            if rerun and isinstance(event, ev.AttemptAbandoned):
                self._abandoned[step] = self._abandoned.get(step, 0) + 1
            else:
                self._reported[step] = self._reported.get(step, 0) + 1
        elif isinstance(event, ev.StepFailed) and self.state.steps[step].kind == "task":
            policy = self.definition.task(name).retry
            last = self._last_end.get(step)
            if rerun and isinstance(last, ev.AttemptAbandoned) and event.error_type == (
                "abandoned"
            ) and self._abandoned[step] != self._cap(name) + 1:
                raise InvariantViolated(
                    f"event {index + 1}: {step} failed as abandoned after "
                    f"{self._abandoned[step]} abandoned attempts; max_abandoned="
                    f"{self._cap(name)} re-runs {self._cap(name)} of them")
            if (isinstance(last, ev.AttemptFailed) and last.retryable
                    and event.error_type == last.error_type
                    and last.error_type not in PERMANENT_ERRORS
                    and (policy.on is None or last.error_type in policy.on)
                    and self._reported[step] < policy.attempts):
                raise InvariantViolated(
                    f"event {index + 1}: {step} failed with {last.error_type} after "
                    f"{self._reported[step]} reported attempts of {policy.attempts} "
                    f"({self._abandoned.get(step, 0)} abandoned ones used up retries?)")

    def _check_batch(self, end: int) -> None:
        """The decisions recorded in [start, end) must come out of the decider again.

        Feed whole commits (as the engine and the Simulator append them): a batch is checked
        when a fact follows it or the history ends.
        """
        start, before = self._batch_start, self._batch_state
        assert start is not None and before is not None
        recorded = [e.body() for e in self._history[start:end]]
        again = [e.body() for e in decide(self.definition, before, self._history[start].at)]
        if again != recorded:
            raise InvariantViolated(
                f"events {start + 1}-{end}: re-deciding gives {[e['type'] for e in again]}, "
                f"the log has {[e['type'] for e in recorded]}")
        self._batch_start = self._batch_state = None


def check_history(definition: Workflow, history: Sequence[ev.Event],
                  live: RunState | None = None) -> None:
    """Check a whole recorded history against every invariant; raise on the first breach."""
    HistoryChecker(definition).feed(history, live)


def _tasks(definition: Workflow) -> dict[str, Step]:
    found: dict[str, Step] = {}
    for step in definition.steps:
        if isinstance(step, Step):
            found[step.name] = step
        elif isinstance(step, Parallel):
            found.update({b.name: b for b in step.branches})
        elif isinstance(step, Map):
            found[step.step.name] = step.step
    return found


def check_workflow(definition: Workflow, outputs: Mapping[str, Any] | None = None, *,
                   inputs: Any = None, signals: Mapping[str, Any] | None = None,
                   max_examples: int = 200, max_actions: int = 60,
                   error_kinds: Sequence[str] = ("server_error", "rate_limited", "timeout",
                                                 "invalid_output", "client_error")) -> None:
    """Explore `definition` with hypothesis; raise InvariantViolated on a breach.

    outputs: per task step name, a hypothesis strategy (or a plain value) for its output;
      default: `st.builds(step.output)` when the step declares an output model, else {}.
    inputs: a strategy (or value) for the run input. signals: per signal name, a strategy
      (or value) for its payload.
    """
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    def strategy(value: Any) -> Any:
        return value if isinstance(value, st.SearchStrategy) else st.just(value)

    out_strategies: dict[str, Any] = {}
    for name, task in _tasks(definition).items():
        if outputs and name in outputs:
            out_strategies[name] = strategy(outputs[name])
        elif task.output is not None:
            # Only outputs the log can hold: the engine fails an attempt whose output it cannot
            # store (an infinite float, say) instead of recording it as a success.
            out_strategies[name] = st.builds(task.output).map(
                lambda m: m.model_dump(mode="json")).filter(lambda o: codec.check_json(o) is None)
        else:
            out_strategies[name] = st.just({})
    signal_names = sorted({s.signal for s in definition.steps if isinstance(s, WaitForSignal)})
    signal_strategies = {n: strategy((signals or {}).get(n, {})) for n in signal_names}
    input_strategy = strategy(inputs) if inputs is not None else st.just({})
    usage = st.builds(ev.Usage, tokens_in=st.integers(0, 50), tokens_out=st.integers(0, 50),
                      cost=st.floats(0, 0.01))
    actions = st.sampled_from(["succeed", "succeed", "succeed", "fail", "wait", "crash",
                               "signal", "cancel"])

    @settings(max_examples=max_examples, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(data=st.data(), seed=st.integers(0, 2**31))
    def explore(data: Any, seed: int) -> None:
        sim = Simulator(definition, seed=seed)
        checker = HistoryChecker(definition)
        sim.start(data.draw(input_strategy, label="input"))
        for _ in range(max_actions):
            if sim.state.terminal:
                break
            for key in sim.ready():
                sim.start_attempt(key)
            action = data.draw(actions, label="action")
            running = sim.running()
            if action in ("succeed", "fail") and running:
                key = data.draw(st.sampled_from(running), label="attempt")
                name = sim.state.steps[key].name
                spent = data.draw(usage, label="usage")
                grant = sim.state.steps[key]
                spent = ev.Usage(tokens_in=min(spent.tokens_in, (grant.max_tokens or 0) // 2),
                                 tokens_out=min(spent.tokens_out, (grant.max_tokens or 0) // 2),
                                 cost=min(spent.cost, grant.max_cost))
                if action == "succeed":
                    sim.succeed(key, data.draw(out_strategies[name], label=name), spent)
                else:
                    kind = data.draw(st.sampled_from(list(error_kinds)), label="error")
                    after = data.draw(st.none() | st.floats(0, 30), label="retry_after")
                    sim.fail(key, kind, retryable=kind != "client_error", usage=spent,
                             retry_after=after)
            elif action == "crash":
                sim.crash()
            elif action == "signal" and signal_names:
                name = data.draw(st.sampled_from(signal_names), label="signal")
                sim.signal(name, data.draw(signal_strategies[name], label="payload"))
            elif action == "cancel" and data.draw(st.booleans(), label="really cancel"):
                sim.cancel("explored cancellation")
            else:
                sim.advance_time(data.draw(st.floats(0.001, 120), label="seconds"))
            checker.feed(sim.history, sim.state)
        # Termination: with every attempt succeeding and time passing, the run must end.
        sim.run_to_end({name: data.draw(s, label=f"final {name}")
                        for name, s in out_strategies.items()}, max_rounds=10_000)
        if not sim.state.terminal:
            sim.advance_time(definition.limits.deadline + 1)
        if not sim.state.terminal:
            raise InvariantViolated("the run did not end, even after its deadline")
        checker.feed(sim.history, sim.state)

    explore()
