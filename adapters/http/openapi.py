"""The OpenAPI 3 document of the HTTP API (served at /openapi.json, fuzzed by the tests)."""

from __future__ import annotations

from typing import Any

_ERROR = {"$ref": "#/components/schemas/Error"}
_RUN_ID = {"name": "run_id", "in": "path", "required": True,
           "schema": {"type": "string", "format": "uuid"}}


_ERROR_TYPES = (
    "What went wrong, for programs: bad_request, malformed_json, unauthorized, not_found, "
    "method_not_allowed, too_large, unsupported_media_type, invalid_input, run_ended "
    "(409: the run has ended), run_held (409: the run waits for its workflow version to be "
    "registered), overloaded (503), unavailable (503), corrupt_run, internal (500).")


def _errors(*codes: int) -> dict[str, Any]:
    reasons = {400: "Malformed request", 401: "Missing or wrong bearer token",
               404: "No such run or workflow",
               409: "The run takes no more signals or cancellations: it has ended (error type "
                    "run_ended) or it is held, its workflow version not being registered "
                    "(error type run_held)",
               413: "Body too large", 415: "Not JSON", 422: "Input does not match the schema",
               429: "Too many requests", 503: "Engine saturated; retry after Retry-After"}
    return {str(c): {"description": reasons[c],
                     "content": {"application/json": {"schema": _ERROR}}} for c in codes}


def _json(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def document(security: bool) -> dict[str, Any]:
    auth_errors = (401,) if security else ()
    run_ref = {"$ref": "#/components/schemas/Run"}
    doc: dict[str, Any] = {
        "openapi": "3.0.3",
        "info": {"title": "rulebound", "version": "1",
                 "description": "Start, follow, signal and explain workflow runs."},
        "paths": {
            "/v1/runs": {
                "post": {
                    "operationId": "startRun",
                    "summary": "Start a run (the same Idempotency-Key gives the same run)",
                    "parameters": [{"name": "Idempotency-Key", "in": "header",
                                    "required": False,
                                    "schema": {"type": "string", "maxLength": 200}}],
                    "requestBody": {"required": True, "content": {"application/json": {
                        "schema": {"$ref": "#/components/schemas/StartRun"}}}},
                    "responses": {
                        "201": _json({"$ref": "#/components/schemas/Started"}, "Started"),
                        "200": _json({"$ref": "#/components/schemas/Started"},
                                     "Already started with that idempotency key"),
                        **_errors(400, *auth_errors, 404, 413, 415, 422, 503)},
                },
                "get": {
                    "operationId": "listRuns",
                    "summary": "List runs, newest first",
                    "parameters": [
                        {"name": "status", "in": "query", "required": False, "schema": {
                            "type": "string",
                            "enum": ["running", "completed", "failed", "cancelled"]}},
                        {"name": "workflow", "in": "query", "required": False,
                         "schema": {"type": "string", "maxLength": 128}},
                        {"name": "limit", "in": "query", "required": False,
                         "schema": {"type": "integer", "minimum": 1, "maximum": 1000}},
                        {"name": "offset", "in": "query", "required": False,
                         "schema": {"type": "integer", "minimum": 0}},
                    ],
                    "responses": {"200": _json({"$ref": "#/components/schemas/RunList"}),
                                  **_errors(400, *auth_errors)},
                },
            },
            "/v1/runs/{run_id}": {"get": {
                "operationId": "getRun", "parameters": [_RUN_ID],
                "responses": {"200": _json(run_ref), **_errors(*auth_errors, 404)}}},
            "/v1/runs/{run_id}/events": {"get": {
                "operationId": "runEvents",
                "summary": "The run's events (JSON), or a server-sent event stream with "
                           "follow=1 (resume with Last-Event-ID)",
                "description": "Events after sequence number `after` (or Last-Event-ID). "
                               "An unknown run is a 404 whatever the position. A followed "
                               "stream ends after the run's last event; while it is idle "
                               "the server sends a `: keepalive` comment line every 15 s.",
                "parameters": [
                    _RUN_ID,
                    {"name": "follow", "in": "query", "required": False,
                     "schema": {"type": "integer", "enum": [0, 1]}},
                    {"name": "after", "in": "query", "required": False,
                     "schema": {"type": "integer", "minimum": 0}},
                    {"name": "Last-Event-ID", "in": "header", "required": False,
                     "schema": {"type": "string"}},
                ],
                "responses": {
                    "200": {"description": "Events",
                            "content": {"application/json": {"schema": {
                                "type": "array", "items": {"type": "object"}}},
                                "text/event-stream": {"schema": {"type": "string"}}}},
                    **_errors(400, *auth_errors, 404)}}},
            "/v1/runs/{run_id}/explain": {"get": {
                "operationId": "explainRun", "parameters": [_RUN_ID],
                "responses": {"200": {"description": "Explanation", "content": {
                    "text/plain": {"schema": {"type": "string"}}}},
                    **_errors(*auth_errors, 404)}}},
            "/v1/runs/{run_id}/signals/{name}": {"post": {
                "operationId": "signalRun",
                "parameters": [_RUN_ID, {"name": "name", "in": "path", "required": True,
                                         "schema": {"type": "string", "minLength": 1,
                                                    "maxLength": 128}}],
                "requestBody": {"required": False, "content": {"application/json": {
                    "schema": {}}}},
                "responses": {"202": _json({"$ref": "#/components/schemas/Accepted"},
                                           "Signal recorded"),
                              **_errors(400, *auth_errors, 404, 409, 413, 415, 422)}}},
            "/v1/runs/{run_id}/cancel": {"post": {
                "operationId": "cancelRun", "parameters": [_RUN_ID],
                "requestBody": {"required": False, "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/Cancel"}}}},
                "responses": {"202": _json({"$ref": "#/components/schemas/Accepted"},
                                           "Cancellation recorded"),
                              **_errors(400, *auth_errors, 404, 409, 413, 415)}}},
            "/v1/workflows": {"get": {
                "operationId": "listWorkflows",
                "responses": {"200": _json({"type": "object", "properties": {
                    "workflows": {"type": "array", "items": {"type": "object"}}}}),
                    **_errors(*auth_errors)}}},
            "/v1/workflows/{name}": {"get": {
                "operationId": "getWorkflow",
                "parameters": [{"name": "name", "in": "path", "required": True,
                                "schema": {"type": "string", "minLength": 1}}],
                "responses": {"200": _json({"type": "object"}, "The workflow's graph"),
                              **_errors(*auth_errors, 404)}}},
            "/healthz": {"get": {"operationId": "health", "security": [],
                                 "responses": {"200": _json({"type": "object"})}}},
            "/metrics": {"get": {"operationId": "metrics", "security": [],
                                 "responses": {"200": {"description": "Prometheus text",
                                                       "content": {"text/plain": {
                                                           "schema": {"type": "string"}}}}}}},
            "/openapi.json": {"get": {"operationId": "openapi", "security": [],
                                      "responses": {"200": _json({"type": "object"})}}},
        },
        "components": {"schemas": {
            "StartRun": {"type": "object", "required": ["workflow"],
                         "additionalProperties": False, "properties": {
                             "workflow": {"type": "string", "minLength": 1, "maxLength": 128},
                             "input": {},
                             "idempotency_key": {"type": "string", "maxLength": 200}}},
            "Started": {"type": "object", "required": ["run_id"], "properties": {
                "run_id": {"type": "string", "format": "uuid"},
                "status": {"type": "string"}}},
            "Cancel": {"type": "object", "additionalProperties": False, "properties": {
                "reason": {"type": "string", "maxLength": 1000}}},
            "Accepted": {"type": "object", "properties": {"run_id": {"type": "string"},
                                                          "status": {"type": "string"}}},
            "Run": {"type": "object", "required": ["run_id", "workflow", "status"],
                    "properties": {"run_id": {"type": "string"},
                                   "workflow": {"type": "string"},
                                   "status": {"type": "string"}, "output": {},
                                   "steps": {"type": "object"}, "usage": {"type": "object"}}},
            "RunList": {"type": "object", "properties": {
                "runs": {"type": "array", "items": {"type": "object"}},
                "next_offset": {"type": "integer", "nullable": True}}},
            "Error": {"type": "object", "required": ["error"], "properties": {
                "error": {"type": "object", "required": ["type", "message"], "properties": {
                    "type": {"type": "string", "description": _ERROR_TYPES},
                    "message": {"type": "string"}}}}},
        }},
    }
    if security:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        doc["security"] = [{"bearer": []}]
    return doc
