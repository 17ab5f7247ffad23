"""Explainable transition conditions.

A condition is data, not a lambda: it can be hashed into the definition, checked against output
schemas when the workflow is built, printed, and evaluated while recording the values it read.
Build them from paths with Python operators:

    field("classify.category") == "billing"
    (field("classify.confidence") < 0.6) | field("input.vip")

A path starts with `input` (the run input), a step name (that step's latest output), `error`
(the failure being handled), `signals`, `limit`, or for map items `item` / `index`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MISSING: Any = type("Missing", (), {"__repr__": lambda self: "<missing>"})()

_OPS: dict[str, str] = {
    "eq": "==", "ne": "!=", "lt": "<", "le": "<=", "gt": ">", "ge": ">=",
    "in": "in", "not_in": "not in", "contains": "contains",
}


def resolve(path: str, context: Mapping[str, Any]) -> Any:
    """The value at a dotted path (list indexes allowed), or MISSING; never raises."""
    head, _, rest = path.partition(".")
    value = context.get(head, MISSING)
    if not rest:
        return value
    for part in rest.split("."):
        if isinstance(value, Mapping):
            value = value.get(part, MISSING)
        elif isinstance(value, list | tuple) and part.lstrip("-").isdigit():
            index = int(part)
            value = value[index] if -len(value) <= index < len(value) else MISSING
        else:
            return MISSING
        if value is MISSING:
            return MISSING
    return value


class _Base(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    def __and__(self, other: Condition) -> AllOf:
        return AllOf(items=(self, other))  # type: ignore[arg-type]

    def __or__(self, other: Condition) -> AnyOf:
        return AnyOf(items=(self, other))  # type: ignore[arg-type]

    def __invert__(self) -> Not:
        return Not(item=self)  # type: ignore[arg-type]

    def __bool__(self) -> bool:
        raise TypeError("conditions are data: combine them with &, | and ~, not and/or/not")


def _test(op: str, left: Any, right: Any) -> bool:
    if left is MISSING:
        return op == "ne" or op == "not_in"
    try:
        if op == "eq":
            return bool(left == right)
        if op == "ne":
            return bool(left != right)
        if op == "lt":
            return bool(left < right)
        if op == "le":
            return bool(left <= right)
        if op == "gt":
            return bool(left > right)
        if op == "ge":
            return bool(left >= right)
        if op == "in":
            return left in right
        if op == "not_in":
            return left not in right
        if op == "contains":
            return right in left
    except TypeError:
        return False  # comparing incomparable values is simply false, never a crash
    raise AssertionError(op)


class Compare(_Base):
    kind: Literal["compare"] = "compare"
    path: str
    op: Literal["eq", "ne", "lt", "le", "gt", "ge", "in", "not_in", "contains"]
    value: Any = None

    def evaluate(self, context: Mapping[str, Any], reads: dict[str, Any]) -> bool:
        left = resolve(self.path, context)
        reads[self.path] = None if left is MISSING else left
        return _test(self.op, left, self.value)

    def paths(self) -> set[str]:
        return {self.path}

    def __str__(self) -> str:
        return f"{self.path} {_OPS[self.op]} {self.value!r}"


class Truthy(_Base):
    kind: Literal["truthy"] = "truthy"
    path: str

    def evaluate(self, context: Mapping[str, Any], reads: dict[str, Any]) -> bool:
        value = resolve(self.path, context)
        reads[self.path] = None if value is MISSING else value
        return value is not MISSING and bool(value)

    def paths(self) -> set[str]:
        return {self.path}

    def __str__(self) -> str:
        return self.path


class Exists(_Base):
    kind: Literal["exists"] = "exists"
    path: str

    def evaluate(self, context: Mapping[str, Any], reads: dict[str, Any]) -> bool:
        value = resolve(self.path, context)
        reads[self.path] = None if value is MISSING else value
        return value is not MISSING and value is not None

    def paths(self) -> set[str]:
        return {self.path}

    def __str__(self) -> str:
        return f"exists({self.path})"


class AllOf(_Base):
    kind: Literal["all"] = "all"
    items: tuple[Condition, ...]

    def evaluate(self, context: Mapping[str, Any], reads: dict[str, Any]) -> bool:
        # Evaluate every item (no short circuit) so the explanation shows all values read.
        results = [item.evaluate(context, reads) for item in self.items]
        return all(results)

    def paths(self) -> set[str]:
        return set().union(*(item.paths() for item in self.items))

    def __str__(self) -> str:
        return "(" + " and ".join(str(i) for i in self.items) + ")"


class AnyOf(_Base):
    kind: Literal["any"] = "any"
    items: tuple[Condition, ...]

    def evaluate(self, context: Mapping[str, Any], reads: dict[str, Any]) -> bool:
        results = [item.evaluate(context, reads) for item in self.items]
        return any(results)

    def paths(self) -> set[str]:
        return set().union(*(item.paths() for item in self.items))

    def __str__(self) -> str:
        return "(" + " or ".join(str(i) for i in self.items) + ")"


class Not(_Base):
    kind: Literal["not"] = "not"
    item: Condition

    def evaluate(self, context: Mapping[str, Any], reads: dict[str, Any]) -> bool:
        return not self.item.evaluate(context, reads)

    def paths(self) -> set[str]:
        return self.item.paths()

    def __str__(self) -> str:
        return f"not {self.item}"


Condition = Annotated[
    Compare | Truthy | Exists | AllOf | AnyOf | Not, Field(discriminator="kind")
]
for _model in (AllOf, AnyOf, Not):
    _model.model_rebuild()


class Ref:
    """A path waiting for an operator; `field("a.b") == 1` builds a `Compare`."""

    __slots__ = ("path",)

    def __init__(self, path: str) -> None:
        self.path = path

    def _cmp(self, op: str, value: Any) -> Compare:
        return Compare(path=self.path, op=op, value=value)  # type: ignore[arg-type]

    def __eq__(self, value: object) -> Compare:  # type: ignore[override]
        return self._cmp("eq", value)

    def __ne__(self, value: object) -> Compare:  # type: ignore[override]
        return self._cmp("ne", value)

    def __lt__(self, value: Any) -> Compare:
        return self._cmp("lt", value)

    def __le__(self, value: Any) -> Compare:
        return self._cmp("le", value)

    def __gt__(self, value: Any) -> Compare:
        return self._cmp("gt", value)

    def __ge__(self, value: Any) -> Compare:
        return self._cmp("ge", value)

    def is_in(self, values: list[Any] | tuple[Any, ...]) -> Compare:
        return self._cmp("in", list(values))

    def not_in(self, values: list[Any] | tuple[Any, ...]) -> Compare:
        return self._cmp("not_in", list(values))

    def contains(self, value: Any) -> Compare:
        return self._cmp("contains", value)

    def exists(self) -> Exists:
        return Exists(path=self.path)

    def is_true(self) -> Truthy:
        return Truthy(path=self.path)

    __hash__ = None  # type: ignore[assignment]


def field(path: str) -> Ref:
    """Start a condition on the value at `path`."""
    return Ref(path)
