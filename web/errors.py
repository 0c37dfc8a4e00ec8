"""Every error becomes ``{error: {code, message}}`` with the right HTTP status.

Views never catch domain errors; this module maps them.
"""

import logging

from flask import jsonify, request
from pydantic import ValidationError
from werkzeug.exceptions import HTTPException

from queue_engine import errors, webhooks

log = logging.getLogger(__name__)

#: The first matching class wins, so subclasses come before their bases.
STATUS_FOR = {
    errors.InvalidRequestError: 400,
    errors.AuthenticationError: 401,
    errors.NotFoundError: 404,
    errors.JobFinishedError: 409,
    errors.BatchFinishedError: 409,
    errors.IdempotencyConflictError: 409,
    webhooks.NoWebhookEventError: 409,
    errors.BrokerUnavailableError: 503,
}


def error_response(status, code, message, param=None):
    body = {"code": code, "message": message}
    if param:
        body["param"] = param
    return jsonify(error=body), status


def describe_validation_error(error):
    """``(message, first field)`` for a pydantic error, in words a user can act on."""
    problems, fields = [], []
    for item in error.errors():
        location = ".".join(str(part) for part in item["loc"])
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown field"
        problems.append(f"{location}: {message}" if location else message)
        fields.append(location or None)
    return "; ".join(problems), fields[0]


def handle_domain_error(error):
    status = next((s for cls, s in STATUS_FOR.items() if isinstance(error, cls)), 400)
    return error_response(status, error.code, str(error), getattr(error, "param", None))


def handle_validation_error(error):
    message, param = describe_validation_error(error)
    return error_response(400, "invalid_request", message, param)


def handle_http_error(error):
    code = error.name.lower().replace(" ", "_")
    message = error.description
    if error.code == 413:
        setting = "batches.max_bytes" if request.endpoint == "batches.create_batch" else "max_body_bytes"
        message = f"the request body is larger than this server accepts ({request.max_content_length} bytes, {setting})"
    return error_response(error.code, code, message)


def handle_unexpected_error(error):
    log.exception("unhandled error")
    return error_response(500, "internal_error", "the server failed to handle this request; it has been logged")


def init_app(app):
    app.register_error_handler(errors.QueueEngineError, handle_domain_error)
    app.register_error_handler(ValidationError, handle_validation_error)
    app.register_error_handler(HTTPException, handle_http_error)
    app.register_error_handler(Exception, handle_unexpected_error)
