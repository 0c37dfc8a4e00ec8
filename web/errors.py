"""Every error becomes ``{error: {code, message}}`` with the right HTTP status;
under ``/v1``, OpenAI's ``{error: {message, type, param, code}}``, so the
official ``openai`` client raises its matching exception class.

Views never catch domain errors; this module maps them. A database that
cannot be reached is a 503, never a 500. (A broker that cannot be reached is
no error at all: the work waits in the database.)
"""

import logging

from flask import jsonify, request
from pydantic import ValidationError
from sqlalchemy import exc as sql_errors
from werkzeug.exceptions import HTTPException

from queue_engine import errors, files, webhooks
from queue_engine.inputs import format_location

log = logging.getLogger(__name__)

#: Database errors that mean "cannot reach it now", not "this request is wrong".
DATABASE_DOWN = (sql_errors.OperationalError, sql_errors.InterfaceError, sql_errors.DisconnectionError,
                 sql_errors.TimeoutError)

#: The first matching class wins, so subclasses come before their bases.
STATUS_FOR = {
    files.FileTooLargeError: 413,
    errors.InvalidRequestError: 400,
    errors.AuthenticationError: 401,
    errors.OperatorOnlyError: 403,
    errors.NotFoundError: 404,
    errors.JobFinishedError: 409,
    errors.BatchFinishedError: 409,
    errors.IdempotencyConflictError: 409,
    webhooks.NoWebhookEventError: 409,
    errors.QuotaExceededError: 429,
    errors.NoWorkerError: 503,
    errors.JobFailedError: 500,
}


#: Where the OpenAI-compatible API lives; its errors take OpenAI's shape.
OPENAI_PREFIX = "/v1/"
#: The upload endpoints and the setting that limits each one's body.
BODY_LIMIT_SETTINGS = {"batches.create_batch": "batches.max_bytes", "v1_files.create_file": "files.max_bytes"}


def error_response(status, code, message, param=None):
    if request.path.startswith(OPENAI_PREFIX):
        return jsonify(error=openai_error(status, code, message, param)), status
    body = {"code": code, "message": message}
    if param:
        body["param"] = param
    return jsonify(error=body), status


def openai_error(status, code, message, param=None):
    """OpenAI's error object. Its clients choose the exception class by the
    HTTP status; ``type`` is OpenAI's coarse kind, ``code`` our precise one."""
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return {"message": message, "type": kind, "param": param, "code": code}


def describe_validation_error(error):
    """``(message, first field)`` for a pydantic error, in words a user can act on."""
    problems, fields = [], []
    for item in error.errors():
        loc = item["loc"]
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown field"
        if loc[-1:] == ("[key]",):  # a dict key: name the dict, show the key
            loc, message = loc[:-2], f"the key {loc[-2]!r}: {message}"
        location = format_location(loc)
        problems.append(f"{location}: {message}" if location else message)
        fields.append(location or None)
    return "; ".join(problems), fields[0]


def handle_domain_error(error):
    status = next((s for cls, s in STATUS_FOR.items() if isinstance(error, cls)), 400)
    body, status = error_response(status, error.code, str(error), getattr(error, "param", None))
    retry_after = getattr(error, "retry_after", None)
    return body, status, {"Retry-After": str(retry_after)} if retry_after is not None else {}


def handle_validation_error(error):
    message, param = describe_validation_error(error)
    return error_response(400, "invalid_request", message, param)


def handle_http_error(error):
    """Werkzeug's own errors (no such path, wrong method, too large) as JSON,
    keeping their headers (a 405's ``Allow``)."""
    code = error.name.lower().replace(" ", "_")
    message = error.description
    headers = [(name, value) for name, value in error.get_headers() if name.lower() != "content-type"]
    if error.code == 404:
        message = f"there is nothing at {request.path!r}; the API is described at /api/v1/openapi.json"
    elif error.code == 405:
        allowed = ", ".join(sorted(error.valid_methods or ()))
        message = f"{request.method} is not allowed on {request.path!r}; use {allowed}"
    elif error.code == 413:
        setting = BODY_LIMIT_SETTINGS.get(request.endpoint, "max_body_bytes")
        message = f"the request body is larger than this server accepts ({request.max_content_length} bytes, {setting})"
    body, status = error_response(error.code, code, message)
    return body, status, headers


def handle_database_error(error):
    """503 when the database cannot be reached; any other database error is a bug (500)."""
    if not (isinstance(error, DATABASE_DOWN) or getattr(error, "connection_invalidated", False)):
        return handle_unexpected_error(error)
    cause = getattr(error, "orig", None) or error  # the driver's words, without SQLAlchemy's statement
    log.warning("database unavailable, answered 503: %s: %s",
                type(cause).__name__, str(cause).strip().partition("\n")[0])
    return error_response(503, "database_unavailable", "the database is unavailable right now; try again shortly")


def handle_unexpected_error(error):
    log.exception("unhandled error")
    return error_response(500, "internal_error", "the server failed to handle this request; it has been logged")


def init_app(app):
    app.register_error_handler(errors.QueueEngineError, handle_domain_error)
    app.register_error_handler(ValidationError, handle_validation_error)
    app.register_error_handler(HTTPException, handle_http_error)
    app.register_error_handler(sql_errors.SQLAlchemyError, handle_database_error)
    app.register_error_handler(Exception, handle_unexpected_error)
