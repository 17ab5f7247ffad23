"""Read-only snapshots of runs handed to callers (the live state stays inside the engine)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from uuid import UUID

from rulebound.domain.events import Usage
from rulebound.domain.state import RunState

_NO_USAGE = Usage(tokens_in=0, tokens_out=0, cost=0.0)  # frozen: safe to share


def _usage(tokens_in: int, tokens_out: int, cost: float) -> Usage:
    """The run's usage; a run that spent nothing shares one validated instance."""
    if not (tokens_in or tokens_out or cost):
        return _NO_USAGE
    return Usage(tokens_in=tokens_in, tokens_out=tokens_out, cost=cost)


@dataclass(frozen=True, slots=True)
class StepView:
    status: str
    visit: int
    attempt: int
    output: Any = None
    error: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class RunView:
    """What `Engine.get` and `Engine.wait` return.

    status is the run's (running, completed, failed, cancelled), or "held" when the version
    it started on is not registered, or "quarantined" when its log cannot be folded.
    """

    run_id: UUID
    workflow: str
    status: str
    definition_hash: str = ""
    output: Any = None
    error_type: str | None = None
    reason: str | None = None
    usage: Usage = field(default_factory=Usage)
    steps: dict[str, StepView] = field(default_factory=dict)
    version: int = 0
    started_at: datetime | None = None
    updated_at: datetime | None = None
    waiting_for: tuple[str, ...] = ()
    steps_taken: int = 0
    attempts: int = 0
    retries: int = 0

    @property
    def terminal(self) -> bool:
        return self.status in ("completed", "failed", "cancelled")

    @classmethod
    def of(cls, run_id: UUID, state: RunState, *, status: str | None = None,
           reason: str | None = None, waiting_for: tuple[str, ...] = ()) -> RunView:
        steps = {
            key: StepView(status=st.status, visit=st.visit, attempt=st.attempt,
                          output=st.output, error=dict(st.error) if st.error else None)
            for key, st in state.steps.items()
        }
        return cls(
            run_id=run_id, workflow=state.workflow, status=status or state.status,
            definition_hash=state.definition_hash, output=state.output,
            error_type=state.error_type, reason=reason or state.reason,
            usage=_usage(state.tokens_in, state.tokens_out, state.cost),
            steps=steps, version=state.version, started_at=state.started_at,
            updated_at=state.updated_at, waiting_for=waiting_for,
            steps_taken=state.steps_taken, attempts=state.attempts, retries=state.retries,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_id": str(self.run_id), "workflow": self.workflow, "status": self.status,
            "definition_hash": self.definition_hash, "output": self.output,
            "error_type": self.error_type, "reason": self.reason,
            "usage": self.usage.model_dump(), "version": self.version,
            "started_at": self.started_at.isoformat() if self.started_at else None,
            "updated_at": self.updated_at.isoformat() if self.updated_at else None,
            "waiting_for": list(self.waiting_for), "steps_taken": self.steps_taken,
            "attempts": self.attempts, "retries": self.retries,
            "steps": {k: {"status": s.status, "visit": s.visit, "attempt": s.attempt,
                          "output": s.output, "error": s.error}
                      for k, s in self.steps.items()},
        }
