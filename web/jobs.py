"""``/api/v1/jobs``: submit, read, list and cancel single jobs."""

from flask import Blueprint, g, request, url_for

from queue_engine import jobs
from queue_engine.errors import InvalidRequestError
from queue_engine.schemas import JobCreate

from .auth import require_api_key
from .db import get_session
from .queueing import submit_job

bp = Blueprint("jobs", __name__, url_prefix="/api/v1")
bp.before_request(require_api_key)

MAX_IDEMPOTENCY_KEY = 255


def json_body():
    """The request's JSON object, or a 400 that says why there is none."""
    body = request.get_json(force=True, silent=True)
    if not isinstance(body, dict):
        raise InvalidRequestError("the request body must be a JSON object", "invalid_json")
    return body


def idempotency_key():
    key = request.headers.get("Idempotency-Key")
    if key is not None and not (0 < len(key) <= MAX_IDEMPOTENCY_KEY and key.isprintable()):
        raise InvalidRequestError(f"Idempotency-Key: must be 1 to {MAX_IDEMPOTENCY_KEY} printable characters")
    return key


def query_int(name, default):
    raw = request.args.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise InvalidRequestError(f"{name}: {raw!r} is not an integer") from None


@bp.post("/jobs")
def create_job():
    job, _ = submit_job(JobCreate.model_validate(json_body()), idempotency_key())
    return jobs.job_to_dict(job), 202, {"Location": url_for(".get_job", job_id=job.id)}


@bp.get("/jobs/<job_id>")
def get_job(job_id):
    return jobs.job_to_dict(jobs.get_job(get_session(), g.api_key.id, job_id))


@bp.get("/jobs")
def list_jobs():
    page, next_cursor = jobs.list_jobs(
        get_session(), g.api_key.id,
        status=request.args.get("status"), limit=query_int("limit", 20), cursor=request.args.get("cursor"),
    )
    return {"data": [jobs.job_to_dict(job) for job in page], "next_cursor": next_cursor}


@bp.post("/jobs/<job_id>/cancel")
def cancel_job(job_id):
    session = get_session()
    job = jobs.cancel_job(session, g.api_key.id, job_id)
    session.commit()
    return jobs.job_to_dict(job)
