"""Submitting work: store it, then put its message on the broker.

The row is committed before the message is sent, so a worker never gets a
message for a job it cannot see. If the broker refuses the message the row is
removed again, so a failed submission leaves nothing behind.
"""

from flask import current_app, g
from kombu.exceptions import OperationalError

from queue_engine import jobs
from queue_engine.errors import BrokerUnavailableError
from workers.celery_app import send_job

from .db import get_session


def submit_job(request_body, idempotency_key=None, kind="single"):
    """Create and enqueue a job for the current key; returns ``(job, created)``."""
    session = get_session()
    settings = current_app.extensions["qe_settings"]
    job, created = jobs.create_job(session, g.api_key.id, request_body, settings, idempotency_key, kind=kind)
    session.commit()
    if created:
        try:
            send_job(current_app.extensions["celery"], job)
        except (OperationalError, OSError) as e:
            jobs.delete_unsent_job(session, job.id)
            session.commit()
            raise BrokerUnavailableError(f"the message broker is unreachable ({e}); nothing was stored, try again") from e
    return job, created
