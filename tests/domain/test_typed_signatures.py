"""The definition classes' typed `__init__` (written for type checkers, under TYPE_CHECKING)
names every field with the field's own default, so IDEs and mypy describe what pydantic takes.
"""

from __future__ import annotations

import ast
import inspect

import pytest
from rulebound.domain import definitions
from rulebound.domain.definitions import END, Map, Parallel, Step, WaitForSignal, Workflow

_UNSET = object()


def _typed_inits() -> dict[str, ast.FunctionDef]:
    tree = ast.parse(inspect.getsource(definitions))
    found: dict[str, ast.FunctionDef] = {}
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
        for node in cls.body:
            if (isinstance(node, ast.If) and isinstance(node.test, ast.Name)
                    and node.test.id == "TYPE_CHECKING"):
                for fn in node.body:
                    if isinstance(fn, ast.FunctionDef) and fn.name == "__init__":
                        found[cls.name] = fn
    return found


def _default(node: ast.expr | None) -> object:
    if node is None:
        return _UNSET
    if isinstance(node, ast.Name) and node.id == "END":
        return END
    value = ast.literal_eval(node)
    return _UNSET if value is Ellipsis else value


@pytest.mark.parametrize("cls", [Step, Parallel, Map, WaitForSignal, Workflow])
def test_typed_init_names_every_field_with_its_default(cls: type) -> None:
    fn = _typed_inits()[cls.__name__]
    assert [a.arg for a in fn.args.posonlyargs] == ["self", "name"]
    keywords = dict(zip([a.arg for a in fn.args.kwonlyargs], fn.args.kw_defaults, strict=True))
    fields = {n: f for n, f in cls.model_fields.items() if n not in ("name", "kind")}
    assert sorted(keywords) == sorted(fields)
    for name, node in keywords.items():
        declared = _default(node)
        field = fields[name]
        if field.is_required():
            assert node is None, f"{cls.__name__}.{name} is required"
        elif declared is not _UNSET:  # `...` stands for a default built by the field
            expected = field.get_default(call_default_factory=True)
            assert declared == expected, f"{cls.__name__}.{name}"


def test_positional_name_and_sequences_build_at_run_time() -> None:
    step = Step("a", executor="x", routes=[], input={"v": "input.v"})
    wf = Workflow("w", steps=[Parallel("p", branches=[step], on_failure="$fail")])
    assert wf.steps[0].name == "p"
    assert isinstance(wf.steps, tuple)
