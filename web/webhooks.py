"""``/api/v1/{jobs,batches}/{id}/webhooks``: every delivery attempt, and redelivery."""

from flask import Blueprint, g

from queue_engine import batches, jobs, webhooks

from .auth import require_api_key
from .db import get_session

bp = Blueprint("webhooks", __name__, url_prefix="/api/v1")
bp.before_request(require_api_key)


def events_of_job(job_id):
    session = get_session()
    jobs.get_job(session, g.api_key.id, job_id)  # 404 unless it is the caller's
    return webhooks.events_of(session, job_id=job_id)


def events_of_batch(batch_id):
    session = get_session()
    batches.get_batch(session, g.api_key.id, batch_id)
    return webhooks.events_of(session, batch_id=batch_id)


def attempt_list(events):
    attempts = webhooks.deliveries_of(get_session(), events)
    return {"data": [webhooks.attempt_to_dict(event, delivery) for event, delivery in attempts],
            "events": [webhooks.event_to_dict(event) for event in events]}


def redelivered(events):
    session = get_session()
    event = webhooks.redeliver(session, events)
    session.commit()
    return webhooks.event_to_dict(event), 202


@bp.get("/jobs/<job_id>/webhooks")
def job_webhooks(job_id):
    return attempt_list(events_of_job(job_id))


@bp.post("/jobs/<job_id>/webhooks/redeliver")
def redeliver_job_webhook(job_id):
    return redelivered(events_of_job(job_id))


@bp.get("/batches/<batch_id>/webhooks")
def batch_webhooks(batch_id):
    return attempt_list(events_of_batch(batch_id))


@bp.post("/batches/<batch_id>/webhooks/redeliver")
def redeliver_batch_webhook(batch_id):
    return redelivered(events_of_batch(batch_id))
