"""Submitting work: store it, then put its messages on the broker.

Rows are committed before their messages are sent, so a worker never gets a
message for work it cannot see. If the broker refuses a message, what was
stored is removed again, so a failed submission leaves nothing behind.
"""

from flask import current_app, g
from kombu.exceptions import OperationalError

from queue_engine import batches, jobs, load, targets, tribunal, uploads
from queue_engine.errors import BrokerUnavailableError
from workers.publish import send_chunks, send_job

from . import metrics
from .db import get_session

BROKER_ERRORS = (OperationalError, OSError)


def submit_job(request_body, idempotency_key=None, kind="single"):
    """Create and enqueue a job for the current key; returns ``(job, created)``."""
    session = get_session()
    settings = current_app.extensions["qe_settings"]
    check_webhook_url(request_body, settings)
    job, created = jobs.create_job(session, g.api_key.id, request_body, settings, idempotency_key, kind=kind)
    session.commit()
    if created:
        celery = current_app.extensions["celery"]
        send_or_withdraw(session, lambda: send_job(celery, job), lambda: jobs.delete_unsent_job(session, job.id))
    return job, created


def submit_tribunal(request_body, idempotency_key=None):
    """Create a tribunal and enqueue its first steps; returns ``(job, created)``.

    With ``bypass: auto`` the backlog of its models' queues is read first, and
    decides whether it runs in full or as a single pass.
    """
    session = get_session()
    settings = current_app.extensions["qe_settings"]
    tribunal.check_request(settings, request_body)  # before reading the broker for it
    check_webhook_url(request_body, settings)
    readings = None
    if request_body.bypass == "auto":
        readings = load.read_backlog(session, tribunal.models_of(request_body))
    decision = tribunal.decide(request_body.bypass, readings, settings.tribunal.bypass_backlog)
    job, steps, created = tribunal.create_tribunal(
        session, g.api_key.id, request_body, settings, decision, idempotency_key)
    session.commit()
    if created:
        celery = current_app.extensions["celery"]

        def send_steps():
            for step in steps:
                send_job(celery, step)

        send_or_withdraw(session, send_steps, lambda: tribunal.delete_unsent_tribunal(session, job.id))
        metrics.count_tribunal(job)
    return job, created


def check_webhook_url(request_body, settings):
    """Refuse a ``webhook_url`` the service may not call (``queue_engine.targets``)."""
    if request_body.webhook_url:
        targets.check_url(request_body.webhook_url, settings.webhook_networks)


def submit_batch(request_body, file):
    """Read ``file`` (a werkzeug ``FileStorage``) into a batch and send its chunks.

    The whole file is read in one transaction: a problem with the file
    (:class:`~queue_engine.errors.InvalidFileError`) rolls everything back.
    """
    session = get_session()
    settings = current_app.extensions["qe_settings"]
    check_webhook_url(request_body, settings)
    head = file.stream.read(4096)
    file.stream.seek(0)
    file_format = uploads.detect_format(file.filename, head)
    reader = uploads.read_rows(file.stream, file_format, uploads.Upload.from_request(request_body, settings))
    # On a problem with the file nothing is committed: the request's session
    # is closed (rolled back) when the request ends.
    batch = batches.create_batch(session, g.api_key.id, settings, request_body, reader,
                                 file_format=file_format, filename=file.filename)
    session.commit()
    celery = current_app.extensions["celery"]
    send_or_withdraw(session, lambda: send_chunks(celery, batch), lambda: batches.delete_batch(session, batch.id))
    return batch


def send_or_withdraw(session, send, withdraw):
    """Run ``send``; if the broker refuses, run ``withdraw`` (remove what was
    stored for it), commit, and answer 503."""
    try:
        send()
    except BROKER_ERRORS as e:
        withdraw()
        session.commit()
        raise _broker_unavailable(e) from e


def _broker_unavailable(error):
    return BrokerUnavailableError(f"the message broker is unreachable ({error}); nothing was stored, try again")
