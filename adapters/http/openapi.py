"""The OpenAPI 3.1 document of the HTTP API (served at /openapi.json, fuzzed by the tests).

Generated from the pydantic models in models.py, the ones the server validates requests and
builds answers with: a constraint declared here is a constraint enforced there.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from . import models as m

_REF = "#/components/schemas/{model}"
_SCHEMAS: tuple[type[BaseModel], ...] = (
    m.StartRun, m.Cancel, m.Started, m.Accepted, m.RunList, m.Run, m.StoredEvent,
    m.WorkflowList, m.WorkflowGraph, m.WorkflowVersions, m.Verification, m.Health, m.Readiness,
    m.Error)
_REASONS = {400: "Malformed request", 401: "Missing or wrong bearer token",
            404: "No such run or workflow",
            409: "The run takes no more signals or cancellations: it has ended (error type "
                 "run_ended) or it is held, its workflow version not being registered "
                 "(error type run_held); or the request conflicts with what is stored "
                 "(conflict)",
            413: "Body too large", 415: "Not JSON", 422: "Input does not match the schema",
            503: "Engine saturated (overloaded), still opening and recovering runs "
                 "(not_ready), or the store unavailable (store_unavailable); retry after "
                 "Retry-After"}


@cache
def _components() -> dict[str, Any]:
    _, defs = models_json_schema([(model, "serialization" if model.__name__ not in (
        "StartRun", "Cancel") else "validation") for model in _SCHEMAS], ref_template=_REF)
    return dict(defs.get("$defs", {}))


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": _REF.format(model=model.__name__)}


def _without_null(schema: dict[str, Any]) -> dict[str, Any]:
    """An optional parameter's schema without its `null` branch: absent means the default."""
    options = schema.get("anyOf")
    if options is None:
        return schema
    rest = [s for s in options if s.get("type") != "null"]
    out = {k: v for k, v in schema.items() if k not in ("anyOf", "default")}
    if len(rest) == 1:
        out.update(rest[0])
    else:
        out["anyOf"] = rest
    return out


def parameters(model: type[BaseModel], where: str) -> list[dict[str, Any]]:
    """OpenAPI parameters (query, header or path) from the model that validates them."""
    schema = model.model_json_schema(ref_template=_REF)
    required = set(schema.get("required", ()))
    out = []
    for name, prop in schema.get("properties", {}).items():
        prop = _without_null(dict(prop))
        prop.pop("title", None)
        param: dict[str, Any] = {"name": name, "in": where,
                                 "required": where == "path" or name in required,
                                 "schema": prop}
        if "description" in prop:
            param["description"] = prop.pop("description")
        out.append(param)
    return out


def _errors(*codes: int) -> dict[str, Any]:
    return {str(c): {"description": _REASONS[c],
                     "content": {"application/json": {"schema": _ref(m.Error)}}}
            for c in codes}


def _json(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _body(model: type[BaseModel] | None, required: bool) -> dict[str, Any]:
    schema = _ref(model) if model is not None else {}
    return {"required": required, "content": {"application/json": {"schema": schema}}}


def document(security: bool) -> dict[str, Any]:
    auth = (401,) if security else ()
    run_path = parameters(m.RunPath, "path")
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": "rulebound", "version": "1",
                 "description": "Start, follow, signal and explain workflow runs."},
        "paths": {
            "/v1/runs": {
                "post": {
                    "operationId": "startRun",
                    "summary": "Start a run (the same idempotency key gives the same run)",
                    "parameters": parameters(m.StartRunHeaders, "header"),
                    "requestBody": _body(m.StartRun, True),
                    "responses": {
                        "201": _json(_ref(m.Started), "Started"),
                        "200": _json(_ref(m.Started),
                                     "Already started with that idempotency key"),
                        **_errors(400, *auth, 404, 409, 413, 415, 422, 503)},
                },
                "get": {
                    "operationId": "listRuns",
                    "summary": "List runs, newest first",
                    "parameters": parameters(m.ListRunsQuery, "query"),
                    "responses": {"200": _json(_ref(m.RunList)), **_errors(400, *auth, 503)},
                },
            },
            "/v1/runs/{run_id}": {"get": {
                "operationId": "getRun", "parameters": run_path,
                "responses": {"200": _json(_ref(m.Run)), **_errors(*auth, 404, 503)}}},
            "/v1/runs/{run_id}/events": {"get": {
                "operationId": "runEvents",
                "summary": "The run's events (JSON), or a server-sent event stream with "
                           "follow=1 (resume with Last-Event-ID)",
                "description": "Events after position `after` (or Last-Event-ID). An unknown "
                               "run is a 404 whatever the position. A followed stream ends "
                               "after the run's last event; while it is idle the server "
                               "sends a `: keepalive` comment line every 15 s.",
                "parameters": [*run_path, *parameters(m.EventsQuery, "query"),
                               *parameters(m.EventsHeaders, "header")],
                "responses": {
                    "200": {"description": "Events",
                            "content": {"application/json": {"schema": {
                                "type": "array", "items": _ref(m.StoredEvent)}},
                                "text/event-stream": {"schema": {"type": "string"}}}},
                    **_errors(400, *auth, 404, 503)}}},
            "/v1/runs/{run_id}/explain": {"get": {
                "operationId": "explainRun", "parameters": run_path,
                "responses": {"200": {"description": "Explanation", "content": {
                    "text/plain": {"schema": {"type": "string"}}}},
                    **_errors(*auth, 404, 503)}}},
            "/v1/runs/{run_id}/signals/{name}": {"post": {
                "operationId": "signalRun",
                "parameters": [*parameters(m.SignalPath, "path"),
                               *parameters(m.SignalHeaders, "header")],
                "requestBody": _body(None, False),
                "responses": {"202": _json(_ref(m.Accepted), "Signal recorded"),
                              **_errors(400, *auth, 404, 409, 413, 415, 422, 503)}}},
            "/v1/runs/{run_id}/cancel": {"post": {
                "operationId": "cancelRun", "parameters": run_path,
                "requestBody": _body(m.Cancel, False),
                "responses": {"202": _json(_ref(m.Accepted), "Cancellation recorded"),
                              **_errors(400, *auth, 404, 409, 413, 415, 503)}}},
            "/v1/runs/{run_id}/export": {"get": {
                "operationId": "exportRun",
                "summary": "The run's export as `rulebound export` writes it: one JSON line "
                           "per stored event, then a manifest line",
                "parameters": run_path,
                "responses": {"200": {"description": "JSON lines", "content": {
                    "application/x-ndjson": {"schema": {"type": "string"}}}},
                    **_errors(*auth, 404, 503)}}},
            "/v1/runs/{run_id}/verify": {"get": {
                "operationId": "verifyRun",
                "summary": "Check the run's stored log: hash chain, fold, and every decision "
                           "re-derived from its definition (as `rulebound replay --verify`)",
                "parameters": run_path,
                "responses": {"200": _json(_ref(m.Verification)),
                              **_errors(*auth, 404, 503)}}},
            "/v1/workflows": {"get": {
                "operationId": "listWorkflows",
                "responses": {"200": _json(_ref(m.WorkflowList)), **_errors(*auth, 503)}}},
            "/v1/workflows/{name}": {"get": {
                "operationId": "getWorkflow",
                "parameters": [*parameters(m.WorkflowPath, "path"),
                               *parameters(m.WorkflowQuery, "query")],
                "responses": {"200": _json(_ref(m.WorkflowGraph), "The workflow's graph; "
                                           "each signal step's node carries the JSON schema "
                                           "of the payload it takes (`schema`)"),
                              **_errors(400, *auth, 404, 503)}}},
            "/v1/workflows/{name}/versions": {"get": {
                "operationId": "workflowVersions",
                "summary": "The workflow's registered versions and the runs on each",
                "parameters": parameters(m.WorkflowPath, "path"),
                "responses": {"200": _json(_ref(m.WorkflowVersions)),
                              **_errors(400, *auth, 404, 503)}}},
            "/healthz": {"get": {"operationId": "health", "security": [],
                                 "summary": "Liveness: the process answers (from the moment "
                                            "it listens, before runs are recovered)",
                                 "responses": {"200": _json(_ref(m.Health))}}},
            "/readyz": {"get": {"operationId": "ready", "security": [],
                                "summary": "Readiness: the engine is open and has recovered "
                                           "its runs; until then the run API answers 503 "
                                           "not_ready",
                                "responses": {
                                    "200": _json(_ref(m.Readiness), "Ready"),
                                    "503": _json(_ref(m.Readiness), "Not ready yet (or "
                                                 "shutting down); with Retry-After")}}},
            "/metrics": {"get": {"operationId": "metrics", "security": [],
                                 "responses": {"200": {"description": "Prometheus text",
                                                       "content": {"text/plain": {
                                                           "schema": {"type": "string"}}}}}}},
            "/openapi.json": {"get": {"operationId": "openapi", "security": [],
                                      "responses": {"200": _json({"type": "object"})}}},
        },
        "components": {"schemas": _components()},
    }
    if security:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        doc["security"] = [{"bearer": []}]
    return doc
