"""Every Python block in README.md and docs/*.md runs, each a complete program in a fresh
namespace and an empty temporary directory; the README's picture is the demo's own graph."""

from __future__ import annotations

import re
from pathlib import Path

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rulebound.adapters.demo.workflow import triage

from .examples import ROOT, Block, blocks

BLOCKS = blocks()


def test_every_document_has_blocks() -> None:
    docs = {b.doc for b in BLOCKS}
    assert {"README.md", "docs/executors.md", "docs/serving.md", "docs/auditing.md",
            "docs/testing.md"} <= docs


@pytest.mark.parametrize("block", BLOCKS, ids=[b.name for b in BLOCKS])
def test_block_runs(block: Block, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    code = compile(block.code, block.name, "exec")
    exec(code, {"__name__": "__main__"})  # a fresh namespace per block


def test_the_readme_picture_is_the_demo_workflow() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    pictures = re.findall(r"```mermaid\n(.*?)```", text, re.S)
    assert pictures == [triage.mermaid()]


def test_the_readme_is_a_short_front_door_with_every_part() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    picture = len(triage.mermaid().splitlines())
    assert len(text.splitlines()) - picture <= 180  # prose and code; the picture is extra
    for part in ["## Install and try it", "pip install", "## A first workflow", "asyncio.run",
                 "**How data flows.**", "## The demo", "```mermaid", "## Model steps",
                 '"prompt"', "DefinitionError", "## Serving", "curl ", "--app app:registry",
                 "Registry(", "console at `/`", 'pip install "rulebound[otel]"',
                 "RULEBOUND_OTEL=1", "## Guarantees", "docs/executors.md", "docs/serving.md",
                 "docs/auditing.md", "docs/testing.md", "benchmarks/README.md", "LICENSE"]:
        assert part in text, part


def _recipe() -> dict[str, object]:
    block = next(b for b in BLOCKS if b.doc == "docs/auditing.md" and "def canonical" in b.code)
    namespace: dict[str, object] = {"__name__": "recipe"}
    exec(compile(block.code, block.name, "exec"), namespace)
    return namespace


_RECIPE = _recipe()
_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(_json)
def test_the_standard_library_recipe_serialises_as_the_codec_does(value: object) -> None:
    canonical = _RECIPE["canonical"]
    assert callable(canonical)
    assert canonical(value).encode() == orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
