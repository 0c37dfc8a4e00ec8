"""The OpenAPI document, generated from the same pydantic models that validate
requests and shape responses (``queue_engine.schemas``)."""

from flask import Blueprint
from pydantic.json_schema import models_json_schema

from queue_engine import __version__, schemas

bp = Blueprint("openapi", __name__)

COMPONENTS = [
    (schemas.JobCreate, "validation"),
    (schemas.JobOut, "serialization"),
    (schemas.JobList, "serialization"),
    (schemas.ErrorResponse, "serialization"),
    (schemas.Health, "serialization"),
]


def _ref(name):
    return {"$ref": f"#/components/schemas/{name}"}


def _json(name, description):
    return {"description": description, "content": {"application/json": {"schema": _ref(name)}}}


def _errors(*statuses):
    words = {400: "invalid request", 401: "missing or invalid API key", 404: "not found (or not yours)",
             409: "conflict", 413: "body too large", 503: "broker unavailable"}
    return {str(s): _json("ErrorResponse", words[s]) for s in statuses}


JOB_ID = {"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}}


def build_openapi():
    _, definitions = models_json_schema(COMPONENTS, ref_template="#/components/schemas/{model}")
    return {
        "openapi": "3.1.0",
        "info": {"title": "queue-engine", "version": __version__},
        "components": {
            "schemas": definitions["$defs"],
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
                    "parameters": [
                        {"name": "status", "in": "query", "schema": {"type": "string"}},
                        {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 100}},
                        {"name": "cursor", "in": "query", "schema": {"type": "string"}},
                    ],
                    "responses": {"200": _json("JobList", "a page of jobs"), **_errors(400, 401)},
                },
            },
            "/api/v1/jobs/{job_id}": {
                "get": {
                    "summary": "Read a job",
                    "parameters": [JOB_ID],
                    "responses": {"200": _json("JobOut", "the job"), **_errors(401, 404)},
                },
            },
            "/api/v1/jobs/{job_id}/cancel": {
                "post": {
                    "summary": "Cancel a queued or running job",
                    "parameters": [JOB_ID],
                    "responses": {"200": _json("JobOut", "the job, cancelled"), **_errors(401, 404, 409)},
                },
            },
            "/healthz": {"get": {"security": [], "responses": {"200": _json("Health", "the process answers")}}},
            "/readyz": {
                "get": {
                    "security": [],
                    "responses": {
                        "200": _json("Health", "database and broker answer"),
                        "503": _json("Health", "database or broker unreachable"),
                    },
                }
            },
        },
    }


@bp.get("/api/v1/openapi.json")
def openapi_document():
    return build_openapi()
