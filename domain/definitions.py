"""Workflow definitions: explicit steps, transitions, failure paths and limits.

A definition is data. It is validated when built (`DefinitionError` names the element at
fault), hashes stably (descriptions and titles do not count, behaviour does) and exports its
graph. The decider reads it; nothing in it runs.

    Workflow(
        "triage",
        steps=[
            Step("classify", executor="llm", output=Label, timeout=20, cost=0.002,
                 routes=[Route("escalate", when=field("classify.urgent").is_true())],
                 next="draft"),
            ...
        ],
        on_failure=FAIL,
    )
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from .conditions import Condition
from .errors import DefinitionError

END = "$end"
FAIL = "$fail"
TERMINALS = frozenset({END, FAIL})
# First path segments that are not step names (see domain.conditions).
CONTEXT_ROOTS = frozenset({"input", "error", "signals", "limit", "item", "index"})
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,63}$")
_MAX_ATTEMPTS = 100


def _pydantic_message(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        msg = err["msg"].removeprefix("Value error, ")
        loc = ".".join(str(x) for x in err["loc"])
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)
    # Fields added after definitions were first hashed, with the value that leaves them out
    # of `Workflow.canonical()`: at that value a definition keeps the hash it always had (runs
    # in a store find their version by hash), set to anything else the hash changes.
    _hash_neutral: ClassVar[dict[str, Any]] = {}

    def hashed(self) -> dict[str, Any]:
        """The fields that make up the definition hash, as JSON-compatible values."""
        dumped = self.model_dump(mode="json")
        for name, neutral in self._hash_neutral.items():
            if dumped.get(name) == neutral:
                del dumped[name]
        return dumped

    def __init__(self, *args: Any, **data: Any) -> None:
        # Positional name (Step("classify", ...)) reads like prose; pydantic wants keywords.
        if args:
            if len(args) > 1 or "name" in data:
                raise DefinitionError(f"{type(self).__name__} takes its name as the only "
                                      "positional argument")
            data["name"] = args[0]
        try:
            super().__init__(**data)
        except ValidationError as exc:
            label = f"{type(self).__name__} {data.get('name')!r}" if "name" in data else (
                type(self).__name__)
            raise DefinitionError(f"{label}: {_pydantic_message(exc)}") from None


def _finite(value: float, what: str) -> float:
    if not math.isfinite(value):
        raise ValueError(f"{what} must be finite")
    return value


class Retry(_Frozen):
    """How a step's failed attempts are retried.

    attempts: total attempts per visit, first included (1 = no retry; at most 100).
    backoff: seconds before the first retry, multiplied by `multiplier` for each next one and
      capped by `max_backoff`; `jitter` spreads it by +/- that fraction, drawn from the run's
      recorded seed so replays agree.
    on: error kinds that retry (None: every error the executor marks retryable).
    max_retry_after: the cap on a server's Retry-After hint, in seconds.
    max_abandoned: this step's own cap on abandoned attempts re-run per visit (None: the run's
      `Limits.max_abandoned`; 0: never re-run an abandoned attempt, for a side effect that
      must not happen twice). See `Limits.max_abandoned`.

    Only failures an executor reports count against `attempts`. An attempt cut off by an
    engine stop (crash, deploy, lost lease: `AttemptAbandoned`) is not the step's failure: it
    is re-run at once, without using a retry and whatever `on` says, up to `max_abandoned`.
    """

    _hash_neutral: ClassVar[dict[str, Any]] = {"max_abandoned": None}

    attempts: int = Field(default=3, ge=1, le=_MAX_ATTEMPTS)
    backoff: float = Field(default=1.0, ge=0)
    multiplier: float = Field(default=2.0, ge=1)
    max_backoff: float = Field(default=60.0, gt=0)
    jitter: float = Field(default=0.1, ge=0, le=1)
    on: tuple[str, ...] | None = None
    max_retry_after: float = Field(default=300.0, ge=0)
    max_abandoned: int | None = Field(default=None, ge=0, le=_MAX_ATTEMPTS)

    @field_validator("backoff", "max_backoff", "max_retry_after", "multiplier")
    @classmethod
    def _check_finite(cls, value: float) -> float:
        return _finite(value, "retry timing")

    def delay(self, attempt: int, seed: int, key: str) -> float:
        """Seconds to wait before attempt `attempt + 1`; pure, jitter from (seed, key, attempt)."""
        base = min(self.max_backoff, self.backoff * self.multiplier ** max(0, attempt - 1))
        if not self.jitter or not base:
            return base
        digest = hashlib.blake2b(f"{seed}:{key}:{attempt}".encode(), digest_size=8).digest()
        unit = int.from_bytes(digest, "big") / 2**64  # in [0, 1)
        return max(0.0, base * (1 + self.jitter * (2 * unit - 1)))


NO_RETRY = Retry(attempts=1)


class Limits(_Frozen):
    """Run-level limits. All finite by default, so every run terminates and has a budget.

    max_cost in USD, max_tokens in and out together, max_steps counts step visits (map items
    and parallel branches included), deadline in seconds from the start of the run.
    max_abandoned: per step visit, how many abandoned attempts (cut off by an engine crash,
      stop or lost lease) are re-run; the next abandonment fails the step with error type
      "abandoned" through its failure path, so an attempt that itself kills the process
      cannot loop for ever. Re-runs use none of the step's `Retry.attempts`, ignore
      `Retry.on`, start at once, get the next attempt number and keep the visit's
      idempotency key; each is reserved against the budget like any attempt (and the
      abandoned one is charged its worst case). A step's `Retry.max_abandoned` overrides it.

    Runs record their limits in RunStarted. A run whose RunStarted has no `max_abandoned`
    (started before this limit existed) keeps the rule it ran under: an abandoned attempt is
    an ordinary retryable failure of kind "abandoned", counted against `Retry.attempts`.
    """

    _hash_neutral: ClassVar[dict[str, Any]] = {"max_abandoned": 3}

    max_cost: float = Field(default=1.0, ge=0)
    max_tokens: int = Field(default=200_000, ge=0)
    max_steps: int = Field(default=100, ge=1)
    deadline: float = Field(default=3600.0, gt=0)
    max_abandoned: int = Field(default=3, ge=0, le=_MAX_ATTEMPTS)

    @field_validator("max_cost", "deadline")
    @classmethod
    def _check_finite(cls, value: float) -> float:
        return _finite(value, "a limit")


class Route(_Frozen):
    """A declared edge: go to `to` when `when` holds (routes are tried in order)."""

    to: str
    when: Condition

    def __init__(self, to: str | None = None, /, **data: Any) -> None:
        if to is not None:
            data["to"] = to
        super().__init__(**data)


class _StepBase(_Frozen):
    name: str
    description: str = ""
    routes: tuple[Route, ...] = ()
    next: str = END
    on_failure: str | None = None
    max_visits: int | None = Field(default=None, ge=1, le=10_000)

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError(
                f"step name {value!r} must start with a letter or _, use only letters, "
                "digits, _ and -, and be at most 64 characters"
            )
        if value in CONTEXT_ROOTS:
            raise ValueError(f"step name {value!r} is reserved")
        return value

    def targets(self) -> Iterator[tuple[str, str, str]]:
        """(target, edge kind, label) for every edge leaving this step."""
        for route in self.routes:
            yield route.to, "route", str(route.when)
        yield self.next, "next", "otherwise" if self.routes else "next"
        if self.on_failure is not None:
            yield self.on_failure, "failure", "on failure"

    def can_fail(self) -> bool:
        return True


class Step(_StepBase):
    """A bounded task for one executor.

    input: how the task input is built: None passes the run input; a path string passes that
      value; a mapping {param: path} builds a dict.
    output: the pydantic model the output must satisfy (a mismatch is a failed attempt).
    timeout: seconds per attempt. cost: worst-case USD per attempt; max_tokens: worst-case
      tokens per attempt (given to the executor as its ceiling).
    delay: a durable timer, seconds after scheduling before the step may start.
    """

    kind: Literal["task"] = "task"
    executor: str = Field(min_length=1)
    input: str | dict[str, str] | None = None
    config: dict[str, Any] = Field(default_factory=dict)
    output: type[BaseModel] | None = None
    timeout: float = Field(default=60.0, gt=0)
    retry: Retry = Retry()
    cost: float = Field(default=0.0, ge=0)
    max_tokens: int | None = Field(default=None, ge=1)
    delay: float | None = Field(default=None, ge=0)

    @field_validator("timeout", "cost")
    @classmethod
    def _check_finite(cls, value: float) -> float:
        return _finite(value, "timeout and cost")

    if TYPE_CHECKING:  # the signature type checkers see; at run time _Frozen.__init__ takes it
        def __init__(self, name: str, /, *, executor: str,
                     input: str | Mapping[str, str] | None = None,
                     config: Mapping[str, Any] = ...,
                     output: type[BaseModel] | None = None, timeout: float = 60.0,
                     retry: Retry = ..., cost: float = 0.0, max_tokens: int | None = None,
                     delay: float | None = None, description: str = "",
                     routes: Sequence[Route] = (), next: str = END,
                     on_failure: str | None = None, max_visits: int | None = None) -> None: ...


class Parallel(_StepBase):
    """Named branches run at once; joins when all are done (output: {branch: output}).

    on_branch_failure="fail" fails the step once every branch has finished if any failed;
    "collect" completes it with {"error": ...} in place of a failed branch's output.
    """

    kind: Literal["parallel"] = "parallel"
    branches: tuple[Step, ...] = Field(min_length=1)
    on_branch_failure: Literal["fail", "collect"] = "fail"

    if TYPE_CHECKING:
        def __init__(self, name: str, /, *, branches: Sequence[Step],
                     on_branch_failure: Literal["fail", "collect"] = "fail",
                     description: str = "", routes: Sequence[Route] = (), next: str = END,
                     on_failure: str | None = None, max_visits: int | None = None) -> None: ...


class Map(_StepBase):
    """Run `step` once per item of the list at path `over`, at most `max_concurrency` at a
    time; joins with the outputs in input order (failed items per `on_item_failure`)."""

    kind: Literal["map"] = "map"
    over: str
    step: Step
    max_concurrency: int = Field(default=4, ge=1, le=1000)
    max_items: int = Field(default=100, ge=1, le=10_000)
    on_item_failure: Literal["fail", "collect"] = "fail"

    if TYPE_CHECKING:
        def __init__(self, name: str, /, *, over: str, step: Step, max_concurrency: int = 4,
                     max_items: int = 100, on_item_failure: Literal["fail", "collect"] = "fail",
                     description: str = "", routes: Sequence[Route] = (), next: str = END,
                     on_failure: str | None = None, max_visits: int | None = None) -> None: ...


class WaitForSignal(_StepBase):
    """Wait for the named signal (e.g. a human approval); its payload is the step's output.

    A signal received before the step is reached waits in the run's inbox. After `timeout`
    seconds the step fails with "signal_timeout" and follows `on_timeout` (or on_failure).
    """

    kind: Literal["signal"] = "signal"
    signal: str = Field(min_length=1)
    timeout: float = Field(gt=0)
    on_timeout: str | None = None
    output: type[BaseModel] | None = None

    @field_validator("timeout")
    @classmethod
    def _check_finite(cls, value: float) -> float:
        return _finite(value, "timeout")

    if TYPE_CHECKING:
        def __init__(self, name: str, /, *, signal: str, timeout: float,
                     on_timeout: str | None = None, output: type[BaseModel] | None = None,
                     description: str = "", routes: Sequence[Route] = (), next: str = END,
                     on_failure: str | None = None, max_visits: int | None = None) -> None: ...

    def targets(self) -> Iterator[tuple[str, str, str]]:
        yield from super().targets()
        if self.on_timeout is not None:
            yield self.on_timeout, "timeout", "signal timeout"


AnyStep = Step | Parallel | Map | WaitForSignal


# JSON Schema keywords that only document a schema: they do not change what validates.
_COSMETIC = frozenset({"title", "description", "examples"})
# Keywords whose value maps names (of properties, definitions...) to schemas: the names are
# data, so a property called "title" is a property, not a keyword.
_NAMED_SCHEMAS = frozenset({"properties", "patternProperties", "$defs", "definitions",
                            "dependentSchemas", "dependencies"})
# Keywords whose value is a schema, or a list of schemas.
_SUBSCHEMAS = frozenset({"items", "additionalItems", "prefixItems", "additionalProperties",
                         "unevaluatedItems", "unevaluatedProperties", "propertyNames",
                         "contains", "not", "if", "then", "else", "anyOf", "allOf", "oneOf"})


def _strip_cosmetic(schema: Any) -> Any:
    """A JSON schema without its titles, descriptions and examples, which do not change
    behaviour. They are dropped only where they are keywords of a schema; every other value
    (property names, defaults, consts, enums, keywords this does not know) is kept as is."""
    if not isinstance(schema, dict):
        return schema  # a boolean schema, or a list of dependency names
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in _COSMETIC:
            continue
        if key in _NAMED_SCHEMAS and isinstance(value, dict):
            out[key] = {name: _strip_cosmetic(sub) for name, sub in value.items()}
        elif key in _SUBSCHEMAS:
            out[key] = ([_strip_cosmetic(v) for v in value] if isinstance(value, list)
                        else _strip_cosmetic(value))
        else:
            out[key] = value
    return out


def _schema(model: type[BaseModel] | None) -> Any:
    return None if model is None else _strip_cosmetic(model.model_json_schema())


class Workflow(_Frozen):
    """A validated workflow definition.

    start: the first step (default: the first listed). on_failure: where a failing step goes
    when it declares no path of its own (a step name or FAIL). on_limit: a step to run when a
    run-level limit stops the run from going on (else the run fails).
    """

    name: str = Field(min_length=1, max_length=128)
    version: str = "1"
    description: str = ""
    steps: tuple[Step | Parallel | Map | WaitForSignal, ...] = Field(min_length=1)
    start: str | None = None
    input_schema: type[BaseModel] | None = None
    limits: Limits = Limits()
    on_failure: str | None = None
    on_limit: str | None = None

    _index: dict[str, AnyStep] = PrivateAttr(default_factory=dict)
    _children: dict[str, Step] = PrivateAttr(default_factory=dict)
    _hash: str = PrivateAttr(default="")

    @model_validator(mode="after")
    def _validate(self) -> Workflow:
        try:
            _check(self)
        except DefinitionError as exc:
            raise ValueError(str(exc)) from None
        return self

    if TYPE_CHECKING:
        def __init__(self, name: str, /, *, steps: Sequence[AnyStep], version: str = "1",
                     description: str = "", start: str | None = None,
                     input_schema: type[BaseModel] | None = None, limits: Limits = ...,
                     on_failure: str | None = None, on_limit: str | None = None) -> None: ...
    else:
        def __init__(self, *args: Any, **data: Any) -> None:
            super().__init__(*args, **data)
            self._index_steps()  # a method, so type checkers read its body

    def _index_steps(self) -> None:
        index = {s.name: s for s in self.steps}
        children: dict[str, Step] = {}
        for s in self.steps:
            if isinstance(s, Parallel):
                children.update({b.name: b for b in s.branches})
            elif isinstance(s, Map):
                children[s.step.name] = s.step
        self._index = index
        self._children = children
        self._hash = hashlib.sha256(
            json.dumps(self.canonical(), sort_keys=True, separators=(",", ":"),
                       default=str).encode()
        ).hexdigest()

    # --- lookups used by the decider ---------------------------------------------------

    @property
    def first(self) -> str:
        return self.start or self.steps[0].name

    def step(self, name: str) -> AnyStep:
        try:
            # __pydantic_private__ directly: attribute access to private fields goes
            # through BaseModel.__getattr__, which is slow on the decider's hot path.
            return self.__pydantic_private__["_index"][name]  # type: ignore[index]
        except KeyError:
            raise DefinitionError(f"workflow {self.name!r} has no step {name!r}") from None

    def child(self, name: str) -> Step:
        """A parallel branch or map template, by name."""
        return self._children[name]

    def task(self, name: str) -> Step:
        """A runnable task step by name: a top-level Step, a branch or a map template."""
        private = self.__pydantic_private__
        assert private is not None
        found = private["_children"].get(name) or private["_index"].get(name)
        if not isinstance(found, Step):
            raise DefinitionError(f"workflow {self.name!r} has no task step {name!r}")
        return found

    def max_visits(self, name: str) -> int:
        found = self.step(name)
        return found.max_visits if found.max_visits is not None else 1

    # --- identity and export -----------------------------------------------------------

    @property
    def hash(self) -> str:
        """Stable across processes; changes with behaviour, not with descriptions."""
        return self._hash

    @property
    def key(self) -> str:
        return f"{self.name}@{self.version}"

    def canonical(self) -> dict[str, Any]:
        def step_dict(s: BaseModel) -> dict[str, Any]:
            out: dict[str, Any] = {}
            for name in type(s).model_fields:
                if name == "description":
                    continue
                value = getattr(s, name)
                if name == "output":
                    out[name] = _schema(value)
                elif isinstance(value, Step):
                    out[name] = step_dict(value)
                elif isinstance(value, tuple) and value and isinstance(value[0], Step):
                    # Parallel branches, in declared order: they are scheduled in that order.
                    out[name] = [step_dict(v) for v in value]
                elif isinstance(value, BaseModel | tuple):
                    out[name] = _dump(value)
                else:
                    out[name] = value
            return out

        return {
            "name": self.name,
            "version": self.version,
            "start": self.first,
            "input_schema": _schema(self.input_schema),
            "limits": self.limits.hashed(),
            "on_failure": self.on_failure,
            "on_limit": self.on_limit,
            # Top-level order is not behaviour (the start is explicit, steps are found by
            # name), so it is sorted away.
            "steps": sorted((step_dict(s) for s in self.steps), key=lambda d: d["name"]),
        }

    def graph(self) -> dict[str, Any]:
        """Nodes and labelled edges, for tools and for `rulebound graph`."""
        nodes: list[dict[str, Any]] = []
        edges: list[dict[str, Any]] = []
        for s in self.steps:
            node: dict[str, Any] = {"id": s.name, "kind": s.kind}
            if isinstance(s, Step):
                node["executor"] = s.executor
            elif isinstance(s, Parallel):
                node["branches"] = [b.name for b in s.branches]
            elif isinstance(s, Map):
                node["over"] = s.over
                node["item"] = s.step.name
            elif isinstance(s, WaitForSignal):
                node["signal"] = s.signal
            nodes.append(node)
            for target, kind, label in s.targets():
                edges.append({"from": s.name, "to": target, "kind": kind, "label": label})
        for s in self.steps:
            if self.on_failure is not None and s.on_failure is None:
                edges.append({"from": s.name, "to": self.on_failure, "kind": "failure",
                              "label": "on failure (workflow default)"})
        if self.on_limit is not None:
            edges.append({"from": "*", "to": self.on_limit, "kind": "limit",
                          "label": "a run limit is reached"})
        return {"workflow": self.name, "version": self.version, "hash": self.hash,
                "start": self.first, "nodes": nodes, "edges": edges}

    def mermaid(self, taken: Iterable[tuple[str, str]] = ()) -> str:
        """Mermaid flowchart; edges in `taken` (from, to) are drawn bold (a run's path)."""
        taken_set = set(taken)
        ids = {END: "END", FAIL: "FAIL"}

        def node_id(name: str) -> str:
            return ids.get(name) or "s_" + re.sub(r"[^A-Za-z0-9_]", "_", name)

        lines = ["flowchart TD", f"    START(( )) --> {node_id(self.first)}"]
        shapes = {"task": ("[", "]"), "parallel": ("[[", "]]"), "map": ("[/", "/]"),
                  "signal": ("{{", "}}")}
        for s in self.steps:
            if isinstance(s, Parallel):  # a box holding its branches, run at once
                lines.append(f'    subgraph {node_id(s.name)}["{s.name} (parallel)"]')
                lines.append("        direction LR")
                for b in s.branches:
                    lines.append(f'        {node_id(b.name)}["{b.name}"]')
                lines.append("    end")
                continue
            left, right = shapes[s.kind]
            lines.append(f'    {node_id(s.name)}{left}"{s.name}"{right}')
        lines += ['    END(("end"))', '    FAIL(("fail"))']
        graph = self.graph()
        bold: list[int] = []
        for i, edge in enumerate(e for e in graph["edges"] if e["from"] != "*"):
            label = edge["label"].replace('"', "'")
            arrow = "-.->" if edge["kind"] in ("failure", "timeout") else "-->"
            lines.append(
                f'    {node_id(edge["from"])} {arrow}|"{label}"| {node_id(edge["to"])}'
            )
            if (edge["from"], edge["to"]) in taken_set:
                bold.append(i + 1)  # link 0 is the START arrow
        for i in bold:
            lines.append(f"    linkStyle {i} stroke-width:4px,stroke:#d33")
        return "\n".join(lines) + "\n"


def _dump(value: Any) -> Any:
    if isinstance(value, _Frozen):
        return value.hashed()
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, tuple):
        return [_dump(v) for v in value]
    return value


# --- validation ------------------------------------------------------------------------


def _schema_has(model: type[BaseModel] | None, parts: list[str]) -> bool:
    """Whether dotted `parts` can exist in outputs of `model` (unknown structure: yes)."""
    if model is None or not parts:
        return True
    fields = model.model_fields
    head = parts[0]
    if head not in fields:
        return bool(model.model_config.get("extra") == "allow")
    annotation = fields[head].annotation
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return _schema_has(annotation, parts[1:])
    return True  # dicts, lists, unions: we cannot tell, so we do not refuse


def _check(wf: Workflow) -> None:
    names: dict[str, str] = {}

    def claim(name: str, where: str) -> None:
        if name in names:
            first = names[name]
            both = f"{first} and {where}"
            if first == where:  # "a step" twice: "two steps"; "a branch of 'p'" twice likewise
                both = where.replace("a step", "two steps").replace("a branch", "two branches")
            raise DefinitionError(f"duplicate step name {name!r}: used by {both}")
        names[name] = where

    top: dict[str, AnyStep] = {}
    for s in wf.steps:
        claim(s.name, "a step")
        top[s.name] = s
        if isinstance(s, Parallel):
            for b in s.branches:
                claim(b.name, f"a branch of {s.name!r}")
        elif isinstance(s, Map):
            claim(s.step.name, f"the item step of {s.name!r}")

    outputs: dict[str, type[BaseModel] | None] = {}
    for s in wf.steps:
        if isinstance(s, Step | WaitForSignal):
            outputs[s.name] = s.output
        else:
            outputs[s.name] = None

    def check_target(target: str | None, what: str) -> None:
        if target is None or target in TERMINALS:
            return
        if target not in top:
            hint = " (branches and map item steps cannot be targets)" if target in names else ""
            raise DefinitionError(f"{what} names unknown step {target!r}{hint}")

    def check_path(path: str, what: str, *, item_ok: bool = False) -> None:
        parts = path.split(".")
        head = parts[0]
        if head in ("item", "index"):
            if not item_ok:
                raise DefinitionError(f"{what} reads {path!r}, but only map item steps have "
                                      "an item")
            return
        if head == "input":
            if not _schema_has(wf.input_schema, parts[1:]):
                raise DefinitionError(f"{what} reads {path!r}, but the input schema has no "
                                      f"field {'.'.join(parts[1:])!r}")
            return
        if head in CONTEXT_ROOTS:
            return
        if head not in top:
            raise DefinitionError(f"{what} reads {path!r}, but there is no step {head!r}")
        if not _schema_has(outputs.get(head), parts[1:]):
            raise DefinitionError(f"{what} reads {path!r}, but the output schema of {head!r} "
                                  f"has no field {'.'.join(parts[1:])!r}")

    def type_at(path: str) -> Any:
        """The declared type of the value at `path` (None: not known when building)."""
        parts = path.split(".")
        kind: Any = (wf.input_schema if parts[0] == "input"
                     else outputs.get(parts[0]) if parts[0] not in CONTEXT_ROOTS else None)
        for part in parts[1:]:
            if not _is_model(kind) or part not in kind.model_fields:
                return None
            kind = kind.model_fields[part].annotation
        return kind

    def check_task_inputs(s: Step, item_ok: bool) -> None:
        spec = s.input
        paths = [spec] if isinstance(spec, str) else list((spec or {}).values())
        for p in paths:
            check_path(p, f"the input of step {s.name!r}", item_ok=item_ok)
        prompt = s.config.get("prompt")
        if isinstance(prompt, str):
            _check_prompt(s, prompt, type_at, run_input=not item_ok)

    check_target(wf.start, "the workflow's start")
    check_target(wf.on_failure, "the workflow's on_failure")
    check_target(wf.on_limit, "the workflow's on_limit")
    if wf.on_limit in TERMINALS:
        raise DefinitionError("the workflow's on_limit must be a step (leave it unset to fail)")

    for s in wf.steps:
        for route in s.routes:
            check_target(route.to, f"a route of step {s.name!r}")
            for p in route.when.paths():
                check_path(p, f"the condition {str(route.when)!r} of step {s.name!r}")
        check_target(s.next, f"the next of step {s.name!r}")
        check_target(s.on_failure, f"the on_failure of step {s.name!r}")
        if s.on_failure is None and wf.on_failure is None:
            raise DefinitionError(
                f"step {s.name!r} can fail but has no failure path: set on_failure on the step "
                "or on the workflow (FAIL to fail the run)"
            )
        if isinstance(s, WaitForSignal):
            check_target(s.on_timeout, f"the on_timeout of step {s.name!r}")
        if isinstance(s, Step):
            check_task_inputs(s, item_ok=False)
        elif isinstance(s, Parallel):
            for b in s.branches:
                _check_child(b, f"branch {b.name!r} of {s.name!r}")
                check_task_inputs(b, item_ok=False)
        elif isinstance(s, Map):
            _check_child(s.step, f"item step {s.step.name!r} of {s.name!r}")
            check_task_inputs(s.step, item_ok=True)
            check_path(s.over, f"the list ('over') of map {s.name!r}")

    # Reachability from the start (every declared edge, plus the workflow-level paths).
    edges: dict[str, set[str]] = {name: set() for name in top}
    for s in wf.steps:
        for target, _kind, _label in s.targets():
            if target in top:
                edges[s.name].add(target)
        if s.on_failure is None and wf.on_failure is not None and wf.on_failure in top:
            edges[s.name].add(wf.on_failure)
    # The on_limit path is taken at most once per run, so it counts for reachability only.
    reach = {name: set(targets) for name, targets in edges.items()}
    if wf.on_limit is not None and wf.on_limit in top:
        for targets in reach.values():
            targets.add(wf.on_limit)
    seen = {wf.start or wf.steps[0].name}
    stack = list(seen)
    while stack:
        for nxt in reach[stack.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    for s in wf.steps:
        if s.name not in seen:
            raise DefinitionError(f"step {s.name!r} is unreachable from the start "
                                  f"{wf.start or wf.steps[0].name!r}")

    # Every step on a cycle must bound its visits, so every run terminates.
    for component in _cycles(edges):
        unbounded = sorted(n for n in component if top[n].max_visits is None)
        if unbounded:
            raise DefinitionError(
                f"steps {sorted(component)} form a cycle; set max_visits on {unbounded}"
            )


_SCALARS = (str, int, float, bool)


def _is_model(kind: Any) -> bool:
    return isinstance(kind, type) and issubclass(kind, BaseModel)


def _has(kind: Any, parts: list[str]) -> bool:
    """Whether a value of type `kind` has the field `parts` (unknown type: it may)."""
    if _is_model(kind):
        return _schema_has(kind, parts)
    return not (parts and kind in _SCALARS)  # a str or a number has no fields


def _placeholders(template: str) -> list[str]:
    """The placeholders of a prompt template, read as the model executors fill it: each
    `{` up to the next `}` (`{ticket.subject}` gives 'ticket.subject')."""
    found, i = [], 0
    while (start := template.find("{", i)) >= 0 and (end := template.find("}", start)) >= 0:
        found.append(template[start + 1:end])
        i = end + 1
    return found


def _check_prompt(s: Step, prompt: str, type_at: Callable[[str], Any], *,
                  run_input: bool) -> None:
    """A prompt placeholder must name a field of the step's input wherever the input's
    shape is known when building: the run's input with an `input_schema`, the keys of an
    `input={...}` mapping, or the declared type at an `input="path"`."""
    spec = s.input
    for name in _placeholders(prompt):
        parts = name.split(".")
        field = ".".join(parts[1:])
        if isinstance(spec, dict):
            if parts[0] not in spec:
                keys = ", ".join(repr(k) for k in spec) or "none"
                why = f"its input={{...}} has only {keys}"
            elif not _has(type_at(spec[parts[0]]), parts[1:]):
                why = f"{parts[0]!r} is {spec[parts[0]]!r}, which has no field {field!r}"
            else:
                continue
        elif spec is None and not run_input:  # a map item: its type is not declared
            continue
        else:
            kind = type_at(spec or "input")
            if kind in _SCALARS:  # one value, not a dict: the executor names it {input}
                if name == "input":
                    continue
                why = f"its input {spec!r} is one value, which a prompt names {{input}}"
            elif _has(kind, parts):
                continue
            elif spec is None:
                why = (f"it gets the run's input, and {kind.__name__} has no field "
                       f"{parts[0]!r} (pass input={{...}} to give it other data)")
            else:
                why = f"its input {spec!r} has no field {name!r}"
        raise DefinitionError(f"the prompt of step {s.name!r} names {{{name}}}, which its "
                              f"input does not have: {why}")


def _check_child(s: Step, what: str) -> None:
    if s.routes or s.next != END or s.on_failure is not None or s.max_visits is not None:
        raise DefinitionError(
            f"{what} cannot declare routes, next, on_failure or max_visits: its parent's "
            "join and failure policy decide what happens next"
        )


def _cycles(edges: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components that contain a cycle (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[set[str]] = []
    counter = 0
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, it = work[-1]
            advanced = False
            for nxt in it:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(edges[nxt]))))
                    advanced = True
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1 or node in edges[node]:
                    found.append(component)
    return found
