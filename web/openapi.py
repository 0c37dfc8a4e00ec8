"""The OpenAPI document, generated from the same pydantic models that validate
requests and shape responses (``queue_engine.schemas``)."""

from flask import Blueprint
from pydantic.json_schema import models_json_schema

from queue_engine import __version__, inputs, schemas

bp = Blueprint("openapi", __name__)

COMPONENTS = [
    (schemas.JobCreate, "validation"),
    (schemas.TribunalCreate, "validation"),
    (schemas.JobOut, "serialization"),
    (schemas.JobList, "serialization"),
    (schemas.BatchCreate, "validation"),
    (schemas.BatchOut, "serialization"),
    (schemas.BatchList, "serialization"),
    (schemas.BatchDryRun, "serialization"),
    (schemas.WebhookAttemptList, "serialization"),
    (schemas.WebhookEventOut, "serialization"),
    (schemas.ModelList, "serialization"),
    (schemas.UsageReport, "serialization"),
    (schemas.ErrorResponse, "serialization"),
    (schemas.Health, "serialization"),
]


def _ref(name):
    return {"$ref": f"#/components/schemas/{name}"}


def _json(name, description):
    return {"description": description, "content": {"application/json": {"schema": _ref(name)}}}


def _errors(*statuses):
    """The error answers of an endpoint; 503 always, as every endpoint behind
    a key reads the database (code ``database_unavailable``), and 429, as
    every request of a key counts against its ``requests_per_minute``."""
    words = {400: "invalid request; the message names the field", 401: "missing or invalid API key",
             403: "for operator keys only (operator_only)",
             404: "not found (or not yours)", 409: "conflict", 413: "body too large",
             429: "over a quota of the key: rate_limited (requests_per_minute; Retry-After: seconds to the "
                  "minute's end); on submissions also quota_exceeded (max_waiting_rows, max_waiting_tokens; "
                  "nothing stored) and token_budget_exhausted (Retry-After: seconds to the period's end)",
             503: "the database cannot be reached (database_unavailable); with the broker down, work is still accepted"}
    return {str(s): _json("ErrorResponse", words[s]) for s in sorted({*statuses, 429, 503})}


#: What every request body is held to, beyond each field's schema.
INPUT_RULES = (
    "Bad input is a 400 `{error: {code, message, param}}` naming the field, and changes nothing. "
    "JSON bodies need `Content-Type: application/json`. Types are strict: `\"5\"` is not a number, "
    "`true` is not an integer, `1` is not a string. Text never holds NUL characters or unpaired UTF-16 "
    f"surrogates; JSON nests at most {inputs.MAX_JSON_DEPTH} levels and has no `NaN` or `Infinity`. "
    "A 405 carries `Allow`."
)


JOB_ID = {"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}}
BATCH_ID = {"name": "batch_id", "in": "path", "required": True, "schema": {"type": "string"}}
WAIT = {"name": "wait", "in": "query", "schema": {"type": "number", "minimum": 0},
        "description": "long-poll: answer as soon as it ends, or after this many seconds (at most max_wait)"}
PAGE = [
    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 100}},
    {"name": "cursor", "in": "query", "schema": {"type": "string"}},
]


DRY_RUN = {"name": "dry_run", "in": "query", "schema": {"type": "boolean", "default": False},
           "description": "check the form and read the whole file as an upload does, store nothing, and answer "
                          "200 with the counts, the prompt tokens and the first rows"}


USAGE_QUERY = [
    {"name": "from", "in": "query", "schema": {"type": "string", "format": "date"},
     "description": "first day, YYYY-MM-DD (default: the first of this month, UTC)"},
    {"name": "to", "in": "query", "schema": {"type": "string", "format": "date"},
     "description": "last day, included (default: today, UTC)"},
    {"name": "group_by", "in": "query", "schema": {"type": "string", "enum": ["key", "model", "day"],
                                                     "default": "model"}},
    {"name": "all", "in": "query", "schema": {"type": "boolean", "default": False},
     "description": "every key's usage (operator keys only; 403 operator_only otherwise)"},
]


def batch_upload_schema():
    """The multipart form of ``POST /batches``: BatchCreate's fields, ``params`` as JSON text, and the file."""
    form = schemas.BatchCreate.model_json_schema(ref_template="#/components/schemas/{model}")
    properties = {name: field for name, field in form["properties"].items() if name != "params"}
    properties["params"] = {"type": "string", "contentMediaType": "application/json", "contentSchema": _ref("Params"),
                            "description": "sampling parameters for every row, as JSON text"}
    if "params_columns" in properties:
        properties["params_columns"] = {
            "type": "string", "contentMediaType": "application/json",
            "contentSchema": {"type": "object", "additionalProperties": {"type": "string"}},
            "description": properties["params_columns"].get("description", "")}
    properties["file"] = {"type": "string", "format": "binary", "description": "the CSV or JSONL file"}
    return {"type": "object", "required": ["file", "model"], "properties": properties}


def webhook_list_path(parameter, noun):
    return {"get": {
        "summary": f"Every attempt to deliver the {noun}'s webhook events",
        "parameters": [parameter],
        "responses": {"200": _json("WebhookAttemptList", "the attempts, in order"), **_errors(401, 404)},
    }}


def redeliver_path(parameter, noun):
    return {"post": {
        "summary": f"Send the {noun}'s last webhook event again (same webhook-id, a fresh retry schedule)",
        "parameters": [parameter],
        "responses": {"202": _json("WebhookEventOut", "the event, due now"), **_errors(401, 404, 409)},
    }}


def build_openapi():
    from .openapi_v1 import V1_SCHEMAS, v1_paths  # it builds on this module's helpers
    _, definitions = models_json_schema(COMPONENTS, ref_template="#/components/schemas/{model}")
    return {
        "openapi": "3.1.0",
        "info": {"title": "queue-engine", "version": __version__, "description": INPUT_RULES},
        "components": {
            "schemas": {**definitions["$defs"], **V1_SCHEMAS},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
        "paths": {
            "/api/v1/jobs": {
                "post": {
                    "summary": "Submit a job",
                    "parameters": [{"name": "Idempotency-Key", "in": "header", "required": False, "schema": {"type": "string"}}],
                    "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("JobCreate")}}},
                    "responses": {"202": _json("JobOut", "the job, queued"), **_errors(400, 401, 409, 413, 503)},
                },
                "get": {
                    "summary": "List your jobs, newest first",
                    "parameters": [{"name": "status", "in": "query", "schema": {"type": "string"}}, *PAGE],
                    "responses": {"200": _json("JobList", "a page of jobs"), **_errors(400, 401)},
                },
            },
            "/api/v1/jobs/{job_id}": {
                "get": {
                    "summary": "Read a job",
                    "parameters": [JOB_ID, WAIT],
                    "responses": {"200": _json("JobOut", "the job"), **_errors(400, 401, 404)},
                },
            },
            "/api/v1/jobs/{job_id}/cancel": {
                "post": {
                    "summary": "Cancel a queued or running job",
                    "parameters": [JOB_ID],
                    "responses": {"200": _json("JobOut", "the job, cancelled"), **_errors(401, 404, 409)},
                },
            },
            "/api/v1/jobs/{job_id}/webhooks": webhook_list_path(JOB_ID, "job"),
            "/api/v1/jobs/{job_id}/webhooks/redeliver": redeliver_path(JOB_ID, "job"),
            "/api/v1/tribunals": {
                "post": {
                    "summary": "Submit a tribunal: candidates, a judge's critique, a revised final answer",
                    "parameters": [{"name": "Idempotency-Key", "in": "header", "required": False, "schema": {"type": "string"}}],
                    "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("TribunalCreate")}}},
                    "responses": {"202": _json("JobOut", "the tribunal job, queued"), **_errors(400, 401, 409, 413, 503)},
                },
            },
            "/api/v1/batches": {
                "post": {
                    "summary": "Upload a CSV or JSONL file of prompts as a batch",
                    "parameters": [DRY_RUN],
                    "requestBody": {"required": True,
                                    "content": {"multipart/form-data": {"schema": batch_upload_schema()}}},
                    "responses": {"202": _json("BatchOut", "the batch, its rows queued"),
                                  "200": _json("BatchDryRun", "dry_run=true: what the batch would be; nothing stored"),
                                  **_errors(400, 401, 413, 503)},
                },
                "get": {
                    "summary": "List your batches, newest first",
                    "parameters": PAGE,
                    "responses": {"200": _json("BatchList", "a page of batches"), **_errors(400, 401)},
                },
            },
            "/api/v1/batches/{batch_id}": {
                "get": {
                    "summary": "Read a batch and its request counts",
                    "parameters": [BATCH_ID, WAIT],
                    "responses": {"200": _json("BatchOut", "the batch"), **_errors(400, 401, 404)},
                },
            },
            "/api/v1/batches/{batch_id}/results": {
                "get": {
                    "summary": "One row per input row, in input order (partial while running)",
                    "parameters": [BATCH_ID, {"name": "format", "in": "query",
                                              "schema": {"type": "string", "enum": ["csv", "jsonl"]}}],
                    "responses": {
                        "200": {"description": "the results, streamed",
                                "content": {"text/csv": {"schema": {"type": "string"}},
                                            "application/jsonl": {"schema": {"type": "string"}}}},
                        **_errors(400, 401, 404),
                    },
                },
            },
            "/api/v1/batches/{batch_id}/cancel": {
                "post": {
                    "summary": "Cancel a batch: queued rows at once, running rows finish",
                    "parameters": [BATCH_ID],
                    "responses": {"200": _json("BatchOut", "the batch, cancelling or cancelled"), **_errors(401, 404, 409)},
                },
            },
            "/api/v1/batches/{batch_id}/webhooks": webhook_list_path(BATCH_ID, "batch"),
            "/api/v1/batches/{batch_id}/webhooks/redeliver": redeliver_path(BATCH_ID, "batch"),
            "/api/v1/models": {
                "get": {
                    "summary": "Each model profile: backlog, in-flight requests, SLURM workers by state, "
                               "the autoscaler's last decision and why",
                    "responses": {"200": _json("ModelList", "every configured model profile"),
                                  **_errors(401, 403, 503)},
                },
            },
            "/api/v1/keys/{name}/revoke": {
                "post": {
                    "summary": "Revoke a key at once (operator keys only); cancel_work also cancels its "
                               "unfinished jobs and batches",
                    "parameters": [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}],
                    "requestBody": {"required": False, "content": {"application/json": {"schema": {
                        "type": "object", "additionalProperties": False,
                        "properties": {"cancel_work": {"type": "boolean", "default": False}}}}}},
                    "responses": {
                        "200": {"description": "the key, revoked", "content": {"application/json": {"schema": {
                            "type": "object",
                            "required": ["name", "revoked_at", "cancelled_jobs", "cancelled_batches"],
                            "properties": {"name": {"type": "string"},
                                           "revoked_at": {"type": "string", "format": "date-time"},
                                           "cancelled_jobs": {"type": "integer"},
                                           "cancelled_batches": {"type": "integer"}}}}}},
                        **_errors(400, 401, 403, 404),
                    },
                },
            },
            "/api/v1/usage": {
                "get": {
                    "summary": "What finished requests used (requests, tokens, engine seconds) per key, model or "
                               "day (UTC); your key's, or with all=true an operator's key reads every key's",
                    "parameters": USAGE_QUERY,
                    "responses": {"200": _json("UsageReport", "the usage, one row per group, and its total"),
                                  **_errors(400, 401, 403)},
                },
            },
            **v1_paths(),
            "/metrics": {
                "get": {
                    "security": [],
                    "summary": "Prometheus metrics of this process",
                    "responses": {"200": {"description": "the Prometheus text format",
                                          "content": {"text/plain": {"schema": {"type": "string"}}}}},
                },
            },
            "/healthz": {"get": {"security": [], "responses": {"200": _json("Health", "the process answers")}}},
            "/readyz": {
                "get": {
                    "security": [],
                    "responses": {
                        "200": _json("Health", "the database answers, so work is accepted; status degraded "
                                               "when the broker does not (work waits in the database)"),
                        "503": _json("Health", "the database is unreachable"),
                    },
                }
            },
        },
    }


@bp.get("/api/v1/openapi.json")
def openapi_document():
    return build_openapi()
