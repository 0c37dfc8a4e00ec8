"""``/api/v1/tribunals``: submit a tribunal. It is a job (kind ``tribunal``),
read and cancelled through ``/api/v1/jobs``."""

from flask import Blueprint, url_for

from queue_engine import jobs
from queue_engine.schemas import TribunalCreate

from .auth import require_api_key
from .jobs import idempotency_key, json_body
from .queueing import submit_tribunal

bp = Blueprint("tribunals", __name__, url_prefix="/api/v1")
bp.before_request(require_api_key)


@bp.post("/tribunals")
def create_tribunal():
    job, _ = submit_tribunal(TribunalCreate.model_validate(json_body()), idempotency_key())
    return jobs.job_to_dict(job), 202, {"Location": url_for("jobs.get_job", job_id=job.id)}
