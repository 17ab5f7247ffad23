"""The shapes of the HTTP API: every request body, query, header set and answer.

The server validates each request with these models and builds each answer through them, and
/openapi.json is generated from their JSON schemas (see openapi.py): the document and the
validation are one definition and cannot disagree.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal
from uuid import UUID

from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from rulebound.domain.events import Usage

MAX_NAME = 128  # workflow and signal names
MAX_KEY = 200  # idempotency keys
MAX_REASON = 1000  # a cancellation's reason
MAX_OFFSET = 10**9  # how deep GET /v1/runs pages
MAX_POSITION = 10**12  # event positions (`after`, Last-Event-ID)
RUN_STATUSES = ("running", "completed", "failed", "cancelled")


def _utf8(value: str) -> str:
    """Header, path and query text arrives decoded with surrogate escapes: a byte that is not
    UTF-8 becomes a lone surrogate, which nothing downstream can encode."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be UTF-8 text") from None
    return value


Text = Annotated[str, AfterValidator(_utf8)]
Name = Annotated[Text, Field(min_length=1, max_length=MAX_NAME)]
Key = Annotated[Text, Field(min_length=1, max_length=MAX_KEY,
                            description="The same key (per workflow) gives the same run.")]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)


class _Params(BaseModel):
    """Query strings and headers are text: numbers are parsed from it (lax), and parameters
    we do not know are ignored (as caches and proxies add their own)."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)


# --- requests ---------------------------------------------------------------------------------

class StartRun(_Request):
    """Body of POST /v1/runs."""

    workflow: Name
    input: Any = Field(default=None, description="Checked against the workflow's input schema.")
    idempotency_key: Key | None = None


class StartRunHeaders(_Params):
    idempotency_key: Key | None = Field(
        default=None, alias="Idempotency-Key",
        description="Like the body's idempotency_key; if both are given they must be equal.")
    traceparent: Annotated[Text, Field(max_length=512)] | None = Field(
        default=None, description="W3C trace context: recorded in the run's RunStarted, so "
                                  "its traces (the `otel` extra) join the caller's trace; an "
                                  "invalid value is ignored.")


class ListRunsQuery(_Params):
    status: Literal["running", "completed", "failed", "cancelled"] | None = None
    workflow: Name | None = None
    limit: Annotated[int, Field(ge=1, le=1000)] = 50
    offset: Annotated[int, Field(ge=0, le=MAX_OFFSET)] = 0
    detail: Literal["0", "1"] = Field(
        default="0", description="1: each row also carries the run's usage, attempts and "
                                 "the signals it waits for (read per run; keep pages small).")


class EventsQuery(_Params):
    follow: Literal["0", "1"] = Field(
        default="0", description="1: a server-sent event stream that ends with the run.")
    after: Annotated[int, Field(ge=0, le=MAX_POSITION)] = Field(
        default=0, description="Only events after this position.")


class EventsHeaders(_Params):
    last_event_id: Annotated[int, Field(ge=0, le=MAX_POSITION)] | None = Field(
        default=None, alias="Last-Event-ID",
        description="Resume a stream after this position (the `id:` of the last event seen).")


class SignalHeaders(_Params):
    idempotency_key: Key | None = Field(
        default=None, alias="Idempotency-Key",
        description="The signal's dedup id: the same key again records nothing more and is "
                    "answered as the first request was (409 if it named another signal).")


class SignalPath(_Params):
    run_id: UUID
    name: Name


class RunPath(_Params):
    run_id: UUID


class WorkflowPath(_Params):
    name: Name


class WorkflowQuery(_Params):
    version: Annotated[Text, Field(min_length=1, max_length=MAX_KEY)] | None = Field(
        default=None, description="A definition hash of this workflow (default: the newest).")


class Cancel(_Request):
    """Body of POST /v1/runs/{run_id}/cancel (optional)."""

    reason: Annotated[str, Field(max_length=MAX_REASON)] | None = None


# --- answers ----------------------------------------------------------------------------------

class Started(BaseModel):
    run_id: UUID
    status: Literal["running"] = "running"


class Accepted(BaseModel):
    run_id: UUID
    status: Literal["accepted"] = "accepted"


class RunDetail(BaseModel):
    """What GET /v1/runs?detail=1 adds to each row."""

    definition_hash: str
    usage: Usage
    attempts: int
    retries: int
    steps_taken: int
    waiting_for: list[str]
    started_at: datetime | None = None
    ended_at: datetime | None = Field(default=None, description="Set once the run has ended.")
    reason: str | None = None


class RunRow(BaseModel):
    run_id: UUID
    workflow: str
    status: str
    version: int
    created_at: datetime
    updated_at: datetime
    detail: RunDetail | None = Field(default=None, description="With detail=1 only.")


class RunList(BaseModel):
    runs: list[RunRow]
    next_offset: int | None = Field(description="Pass as offset for the next page; null at "
                                                "the end.")


class StepSummary(BaseModel):
    status: str
    visit: int
    attempt: int
    output: Any = None
    error: Any = None


class Run(BaseModel):
    run_id: UUID
    workflow: str
    status: str = Field(description="running, completed, failed, cancelled or held (waiting "
                                    "for its workflow version to be registered)")
    definition_hash: str
    output: Any = None
    error_type: str | None = None
    reason: str | None = None
    usage: Usage
    version: int
    started_at: datetime | None = None
    updated_at: datetime | None = None
    waiting_for: list[str]
    steps_taken: int
    attempts: int
    retries: int
    steps: dict[str, StepSummary]


class StoredEvent(BaseModel):
    """One event of a run, with its position; the other fields depend on its type."""

    model_config = ConfigDict(extra="allow")

    seq: int
    type: str


class WorkflowSummary(BaseModel):
    name: str
    latest: str = Field(description="The newest version's definition hash.")
    versions: list[str]
    description: str | None = None


class WorkflowList(BaseModel):
    workflows: list[WorkflowSummary]


class WorkflowGraph(BaseModel):
    model_config = ConfigDict(extra="allow")

    nodes: list[dict[str, Any]]
    edges: list[dict[str, Any]]
    mermaid: str


class VersionSummary(BaseModel):
    hash: str
    version: str | None = None
    latest: bool
    runs: int = Field(description="Runs started on this version (of those counted).")


class WorkflowVersions(BaseModel):
    name: str
    versions: list[VersionSummary]
    other_runs: int = Field(description="Counted runs on versions not registered here.")
    counted: int = Field(description="Runs of the workflow counted (the newest first).")
    complete: bool = Field(description="False: the workflow has more runs than were counted.")


class Verification(BaseModel):
    """GET /v1/runs/{run_id}/verify: the checks of `rulebound replay --verify` over the run's
    events as stored (chain, fold, decisions re-derived from the definition)."""

    run_id: UUID
    verdict: Literal["OK", "FAILED", "NOTICE", "UNCHECKED"]
    exit_code: int = Field(description="As `rulebound replay --verify` exits: 0 OK, 2 FAILED, "
                                       "3 NOTICE, 4 UNCHECKED.")
    events: int
    head_hash: str | None
    status: str | None
    decisions_checked: int
    findings: list[str]
    notices: list[str]


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    active_runs: int
    uptime_s: float


class Readiness(BaseModel):
    """GET /readyz: 200 once the engine is open and has recovered its runs, 503 before."""
    ready: bool
    reason: str | None = Field(default=None, description=(
        "What the engine waits for while not ready: starting, opening the store and "
        "recovering runs, shutting down, stopped"))


ERROR_TYPES = (
    "What went wrong, for programs: bad_request, malformed_json, unauthorized, not_found, "
    "method_not_allowed, too_large, unsupported_media_type, invalid_input (422), run_ended "
    "(409: the run has ended), run_held (409: the run waits for its workflow version to be "
    "registered), conflict (409: the request conflicts with what is stored), overloaded "
    "(503), not_ready (503: the engine is still opening and recovering runs; retry after "
    "Retry-After), unavailable (503), store_unavailable (503: the event store did not answer; "
    "retry after Retry-After), corrupt_run, internal (500).")


class ErrorDetail(BaseModel):
    type: str = Field(description=ERROR_TYPES)
    message: str


class Error(BaseModel):
    error: ErrorDetail
