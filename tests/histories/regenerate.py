"""Rewrite the golden histories. Run only for a deliberate change of the event model:

    .venv/bin/python tests/histories/regenerate.py
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

import orjson  # noqa: E402

from tests.histories.golden_workflows import SCRIPTS, stored_lines  # noqa: E402


def main() -> None:
    for name, (_workflow, script) in SCRIPTS.items():
        sim = script()
        (HERE / f"{name}.jsonl").write_bytes(b"\n".join(stored_lines(name, sim.history)) + b"\n")
        (HERE / f"{name}.state.json").write_bytes(
            orjson.dumps(sim.state.to_dict(), option=orjson.OPT_SORT_KEYS | orjson.OPT_INDENT_2)
            + b"\n")
        print(f"{name}: {len(sim.history)} events, ends {sim.state.status}")


if __name__ == "__main__":
    main()
