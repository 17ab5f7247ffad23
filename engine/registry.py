"""A bundle of workflows (several versions each) and executors, loadable as `module:attr`."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from rulebound.domain.definitions import Step, Workflow
from rulebound.domain.errors import DefinitionError, RuleboundError

from .errors import WorkflowNotFound
from .functions import as_executor, check_executors
from .ratelimit import RateLimit


class Executors(dict[str, Any]):
    """Executors by name. Whatever comes in is checked and adapted (see functions.as_executor):
    a plain async function of the step's input is wrapped, a set or a non-callable is a
    DefinitionError naming the problem, at registration rather than at run time."""

    def __init__(self, executors: object = None) -> None:
        super().__init__(check_executors(executors))

    def __setitem__(self, name: str, executor: Any) -> None:
        super().__setitem__(name, as_executor(name, executor))

    def update(self, *args: Any, **kwargs: Any) -> None:
        if len(args) > 1:
            raise TypeError(f"update expected at most 1 argument, got {len(args)}")
        for source in (*args, kwargs):
            super().update(check_executors(source))

    def setdefault(self, name: str, executor: Any = None) -> Any:
        if name not in self:
            self[name] = executor
        return self[name]

    def __ior__(self, other: Any) -> Executors:  # type: ignore[override, misc]
        self.update(other)
        return self


class Registry:
    """Workflows by name and definition hash, and executors by name.

    New runs take the newest registered version of a workflow; a run always resumes on the
    version it started with (found by the hash recorded in its RunStarted).
    """

    def __init__(
        self,
        workflows: Iterable[Workflow] = (),
        executors: Mapping[str, Any] | None = None,
        rate_limits: Mapping[str, RateLimit] | None = None,
    ) -> None:
        """workflows: the definitions (each name may come in several versions).
        executors: name -> executor; an executor is an object with `async __call__(task)`,
          an `async def f(task: Task)`, or a plain `async def f(input)` / `f(input, task)`
          that is called with the step's input (wrapped as a FunctionExecutor).
        rate_limits: name -> RateLimit for the executor of that name.
        """
        self._versions: dict[str, list[Workflow]] = {}
        self._by_hash: dict[str, Workflow] = {}
        self.executors: Executors = Executors(executors)
        self.rate_limits: dict[str, RateLimit] = dict(rate_limits or {})
        for workflow in workflows:
            self.add(workflow)

    def add(self, workflow: Workflow, *, newest: bool = True) -> None:
        """Register a version. `newest=False` registers an older version (so that its runs
        can finish) without making it the one new runs take."""
        if not isinstance(workflow, Workflow):
            raise DefinitionError(f"expected a Workflow, got {type(workflow).__name__}")
        versions = self._versions.setdefault(workflow.name, [])
        known = self._by_hash.get(workflow.hash)
        if known is not None:  # already here: at most it becomes the newest again
            if newest and versions[-1] is not known:
                versions.remove(known)
                versions.append(known)
            return
        if newest or not versions:
            versions.append(workflow)
        else:
            versions.insert(len(versions) - 1, workflow)
        self._by_hash[workflow.hash] = workflow

    def latest(self, name: str) -> Workflow:
        versions = self._versions.get(name)
        if not versions:
            known = ", ".join(sorted(self._versions)) or "none"
            raise WorkflowNotFound(f"no workflow named {name!r} (registered: {known})")
        return versions[-1]

    def by_hash(self, definition_hash: str) -> Workflow | None:
        return self._by_hash.get(definition_hash)

    def names(self) -> list[str]:
        return sorted(self._versions)

    def versions(self, name: str) -> list[Workflow]:
        return list(self._versions.get(name, ()))

    def missing_executors(self) -> list[tuple[str, str]]:
        """(workflow, executor) pairs whose executor is not registered."""
        missing = []
        for versions in self._versions.values():
            for wf in versions:
                for name in _executors_of(wf):
                    if name not in self.executors:
                        missing.append((wf.name, name))
        return sorted(set(missing))

    def executors_missing_for(self, workflow: Workflow) -> set[str]:
        """Executor names `workflow` uses that are not registered."""
        return {name for name in _executors_of(workflow) if name not in self.executors}

    def unreserved_token_steps(self, workflows: Iterable[Workflow]
                               ) -> list[tuple[str, str, str]]:
        """(workflow, step, executor) for task steps of `workflows` on a token-rate-limited
        executor that declare no `max_tokens`.

        A token window can only be kept if every call reserves its worst case before it is
        made; a step without one would be admitted for free and could flood the window.
        """
        found = []
        for wf in workflows:
            for task in _tasks_of(wf):
                limit = self.rate_limits.get(task.executor)
                if limit is not None and limit.tokens is not None and task.max_tokens is None:
                    found.append((wf.name, task.name, task.executor))
        return sorted(set(found))

    def unbudgeted_model_steps(self, workflows: Iterable[Workflow]
                               ) -> list[tuple[str, str, str]]:
        """(workflow, step, executor) for task steps of `workflows` on an executor that spends
        tokens (a model: `spends_tokens = True`) that declare no `max_tokens`.

        A run's token limit is kept by reserving each attempt's worst case before it is
        scheduled; a model step without a ceiling reserves nothing, so a run of such steps
        could spend past its limit.
        """
        found = []
        for wf in workflows:
            for task in _tasks_of(wf):
                executor = self.executors.get(task.executor)
                if getattr(executor, "spends_tokens", False) is True and task.max_tokens is None:
                    found.append((wf.name, task.name, task.executor))
        return sorted(set(found))


def _tasks_of(wf: Workflow) -> list[Step]:
    """Every runnable task step: top-level steps, parallel branches, map templates."""
    found: list[Step] = []
    for step in wf.steps:
        if isinstance(step, Step):
            found.append(step)
        found.extend(getattr(step, "branches", ()))
        inner = getattr(step, "step", None)
        if isinstance(inner, Step):
            found.append(inner)
    return found


def _executors_of(wf: Workflow) -> set[str]:
    return {task.executor for task in _tasks_of(wf)}


class AppLoadError(RuleboundError):
    """`--app` could not be loaded; the message says what to fix."""


def load_app(spec: str) -> Registry:
    """Load a Registry uvicorn-style: `package.module:attr` or `path/to/file.py:attr`.

    A callable attribute is called with no arguments (an app factory).
    """
    def forget(name: str | None) -> None:  # a half-imported file must not stay cached
        if name is not None:
            sys.modules.pop(name, None)

    def line(exc: BaseException) -> str:
        return " ".join(str(exc).split()) or "(no message)"

    module_part, sep, attr = spec.rpartition(":")
    if not sep or not module_part or not attr:
        raise AppLoadError(f"--app {spec!r}: expected 'module:attr' or 'path/file.py:attr'")
    name = None
    try:
        if module_part.endswith(".py") or "/" in module_part:
            path = Path(module_part)
            if not path.is_file():
                raise AppLoadError(f"--app {spec!r}: no file {str(path)!r}")
            name = f"rulebound_app_{abs(hash(path.resolve()))}"
            module_spec = importlib.util.spec_from_file_location(name, path)
            if module_spec is None or module_spec.loader is None:
                raise AppLoadError(f"--app {spec!r}: cannot load {str(path)!r}")
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[name] = module
            module_spec.loader.exec_module(module)
        else:
            if "" not in sys.path and "." not in sys.path:
                sys.path.insert(0, "")
            module = importlib.import_module(module_part)
    except AppLoadError:
        raise
    except ModuleNotFoundError as exc:
        forget(name)
        raise AppLoadError(f"--app {spec!r}: module {exc.name!r} not found") from None
    except DefinitionError as exc:
        forget(name)
        raise AppLoadError(f"--app {spec!r}: invalid definition: {line(exc)}") from None
    except SyntaxError as exc:  # the user's file does not parse: say where
        forget(name)
        where = f"{exc.filename or module_part}:{exc.lineno}" if exc.lineno else module_part
        raise AppLoadError(f"--app {spec!r}: SyntaxError in {where}: {exc.msg}") from None
    except (Exception, SystemExit) as exc:  # the module raised while importing
        forget(name)
        raise AppLoadError(f"--app {spec!r}: importing {module_part!r} raised "
                           f"{type(exc).__name__}: {line(exc)}") from None
    obj = getattr(module, attr, None)
    if obj is None:
        raise AppLoadError(f"--app {spec!r}: {module_part!r} has no attribute {attr!r}")
    if callable(obj) and not isinstance(obj, Registry):
        try:
            obj = obj()
        except DefinitionError as exc:
            raise AppLoadError(f"--app {spec!r}: invalid definition: {line(exc)}") from None
        except (Exception, SystemExit) as exc:
            raise AppLoadError(f"--app {spec!r}: calling {attr!r} raised "
                               f"{type(exc).__name__}: {line(exc)}") from None
    if not isinstance(obj, Registry):
        raise AppLoadError(f"--app {spec!r}: {attr!r} is a {type(obj).__name__}, "
                           "not a rulebound Registry")
    return obj
