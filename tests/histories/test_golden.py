"""Golden histories must keep replaying to the same state. A failure here is a breaking
change of the event model: old logs would no longer mean what they meant."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from rulebound.domain.state import replay
from rulebound.engine import codec
from rulebound.engine.testing import check_history

from tests.histories.golden_workflows import SCRIPTS

HERE = Path(__file__).resolve().parent


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_a_golden_history_replays_to_its_recorded_state(name: str) -> None:
    workflow, _script = SCRIPTS[name]
    lines = (HERE / f"{name}.jsonl").read_bytes().splitlines()
    events = [codec.decode(line) for line in lines]
    prev = codec.GENESIS_HASH
    for line, event in zip(lines, events, strict=True):  # the chain is intact
        assert event.hash == codec.chain_hash(prev, codec.canonical_body(event))
        assert codec.encode(event) == line  # and re-encodes to the same bytes
        prev = event.hash
    state = replay(events)
    expected = orjson.loads((HERE / f"{name}.state.json").read_bytes())
    assert orjson.loads(orjson.dumps(state.to_dict())) == expected
    check_history(workflow, events)  # every decision still re-derives
    assert events[0].definition_hash == workflow.hash  # the definition did not drift


def test_the_golden_set_covers_the_required_shapes() -> None:
    types = set()
    for name in SCRIPTS:
        for line in (HERE / f"{name}.jsonl").read_bytes().splitlines():
            types.add(codec.decode(line).type)
    assert {"AttemptFailed", "AttemptAbandoned", "SignalReceived", "TransitionTaken",
            "StepScheduled", "RunCompleted"} <= types
