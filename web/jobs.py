"""``/api/v1/jobs``: submit, read, list and cancel single jobs."""

from flask import Blueprint, g, request, url_for

from queue_engine import jobs
from queue_engine.errors import InvalidRequestError
from queue_engine.inputs import read_json, text_problem
from queue_engine.schemas import JobCreate

from . import queueing
from .auth import require_api_key
from .db import get_session
from .queueing import submit_job
from .waiting import read_after_wait

bp = Blueprint("jobs", __name__, url_prefix="/api/v1")
bp.before_request(require_api_key)

MAX_IDEMPOTENCY_KEY = 255
JSON_TYPE_NAMES = {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number",
                   type(None): "null"}


def json_body():
    """The request's JSON object, or a 400 that says why there is none.

    Read with :func:`~queue_engine.inputs.read_json`, not Flask's
    ``get_json``, which lets a deeply nested body raise RecursionError.
    """
    if not request.is_json:
        raise InvalidRequestError(
            f"send the body as JSON with the header 'Content-Type: application/json' "
            f"(this request's Content-Type is {request.mimetype or 'missing'!r})", "invalid_content_type")
    data = request.get_data()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InvalidRequestError(f"the request body is not UTF-8 (byte 0x{data[e.start]:02x} at position "
                                  f"{e.start + 1}); send JSON as UTF-8", "invalid_json") from None
    if not text.strip():
        raise InvalidRequestError("the request body is empty; send a JSON object", "invalid_json")
    body = read_json(text)
    if not isinstance(body, dict):
        raise InvalidRequestError(f"the request body must be a JSON object, not {JSON_TYPE_NAMES[type(body)]}",
                                  "invalid_json")
    return body


def idempotency_key():
    key = request.headers.get("Idempotency-Key")
    if key is not None and not (0 < len(key) <= MAX_IDEMPOTENCY_KEY and key.isprintable()):
        raise InvalidRequestError(f"Idempotency-Key: must be 1 to {MAX_IDEMPOTENCY_KEY} printable characters",
                                  param="Idempotency-Key")
    return key


def query_text(name):
    """The query parameter ``name`` (or None), refused when it cannot be text (a NUL, ``%00``)."""
    raw = request.args.get(name)
    problem = raw and text_problem(raw)
    if problem:
        raise InvalidRequestError(f"{name}: {problem}", param=name)
    return raw


def query_int(name, default):
    raw = request.args.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise InvalidRequestError(f"{name}: {raw!r} is not an integer", param=name) from None


@bp.post("/jobs")
def create_job():
    job, _ = submit_job(JobCreate.model_validate(json_body()), idempotency_key())
    return jobs.job_to_dict(job), 202, {"Location": url_for(".get_job", job_id=job.id)}


@bp.get("/jobs/<job_id>")
def get_job(job_id):
    """The job; with ``?wait=S``, once it ends or after S seconds."""
    return jobs.job_to_dict(read_after_wait(
        "job", lambda session: jobs.get_job(session, g.api_key.id, job_id, g.api_key.is_operator)))


@bp.get("/jobs")
def list_jobs():
    page, next_cursor = jobs.list_jobs(
        get_session(), g.api_key.id,
        status=query_text("status"), limit=query_int("limit", 20), cursor=query_text("cursor"),
    )
    return {"data": [jobs.job_to_dict(job) for job in page], "next_cursor": next_cursor}


@bp.post("/jobs/<job_id>/cancel")
def cancel_job(job_id):
    return jobs.job_to_dict(queueing.cancel_job(job_id))
