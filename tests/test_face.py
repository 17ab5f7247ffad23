"""The public face: `from rulebound import ...` is the one documented import.

Pinning the exported names means a refactor behind the face cannot change the API by
accident; a name added or removed here is a decision, made in this file.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

import rulebound

FACE = {
    # writing workflows
    "Workflow", "Step", "Retry", "Limits", "Route", "Parallel", "Map", "WaitForSignal",
    "END", "FAIL", "field",
    # running them
    "Engine", "Registry", "RateLimit", "Retention", "RunView", "StepView",
    # writing executors
    "Executor", "Task", "Result", "Usage", "Spend", "ExecutorContext", "ExecutorError",
    "RetryableError", "PermanentError",
    # executors that ship
    "OpenAIChat", "AnthropicMessages", "HttpTool", "FunctionExecutor", "ScriptedModel",
    "Script",
    # errors
    "RuleboundError", "DefinitionError", "RunNotFound", "CorruptRun", "InvalidEvent",
    "WorkflowNotFound", "InvalidInput", "RunTerminal", "EngineClosed", "Overloaded",
    "StoreError", "StoreUnavailable", "ConcurrencyConflict", "Conflict", "IdempotencyConflict",
    "AppLoadError",
    # replaying and property-testing
    "Event", "RunState", "evolve", "replay", "decide", "Simulator", "check_workflow",
    "InvariantViolated", "FaultyStore",
}


def test_the_face_exports_exactly_the_pinned_names() -> None:
    assert set(rulebound.__all__) == FACE
    assert len(rulebound.__all__) == len(FACE)  # no name listed twice


def test_every_exported_name_resolves_to_its_defining_object() -> None:
    for name in rulebound.__all__:
        value = getattr(rulebound, name)
        assert value is not None, name
        home = getattr(value, "__module__", None)
        if home is not None and isinstance(value, type):
            assert home.startswith("rulebound."), (name, home)


def test_every_error_in_the_face_is_a_rulebound_error() -> None:
    for name in rulebound.__all__:
        value = getattr(rulebound, name)
        if isinstance(value, type) and issubclass(value, Exception):
            assert issubclass(value, rulebound.RuleboundError), name


def test_an_unknown_name_is_an_attribute_error_naming_it() -> None:
    with pytest.raises(AttributeError, match="Nope"):
        rulebound.Nope  # type: ignore[attr-defined]  # noqa: B018


def test_importing_the_face_loads_no_engine_or_adapter_until_a_name_is_used() -> None:
    code = ("import sys, rulebound; "
            "print(sorted(m for m in sys.modules if m.split('.')[:2] in ("
            "['rulebound', 'domain'], ['rulebound', 'engine'], ['rulebound', 'adapters'])))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


def test_no_top_level_domain_engine_or_adapters_package_is_installed() -> None:
    code = ("import importlib.util as u; "
            "print([n for n in ('domain', 'engine', 'adapters') if u.find_spec(n)])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd="/").stdout
    assert out.strip() == "[]"


def test_type_checkers_see_every_name_re_exported_from_its_home() -> None:
    """The TYPE_CHECKING imports spell `X as X` (what `mypy --strict` needs to see a re-export)
    for exactly the names the face loads, from the module it loads them from."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(rulebound))
    block = next(n for n in tree.body if isinstance(n, ast.If)
                 and isinstance(n.test, ast.Name) and n.test.id == "TYPE_CHECKING")
    seen: dict[str, str] = {}
    for node in block.body:
        assert isinstance(node, ast.ImportFrom)
        for alias in node.names:
            assert alias.asname == alias.name, f"{alias.name} is not re-exported"
            seen[alias.name] = str(node.module)
    assert seen == rulebound._HOMES
