"""Submitting work: store it, then put its messages on the broker.

Jobs are committed, marked sent, before their messages go out, so a worker
never gets a message for work it cannot see. A batch's rows wait in the
database for the dispatcher, which sends them by fair share between keys.
Accepted means stored: if the broker refuses (or is down), the work is
marked unsent and the answer is still 202; the dispatcher sends it when the broker is back. If this process
dies between the commit and the send, the dispatcher finds the messages
missing from the broker and sends them (``queue_engine.dispatch``).

Cancelling is here too, so that every way in (the API, the dashboard)
counts what it submitted and what it cancelled in the metrics alike, once
committed (``web/metrics.py``).
"""

from flask import current_app, g
from sqlalchemy import select

from queue_engine import batches, faults, jobs, load, quotas, targets, tokenizers, tribunal, uploads
from queue_engine.jobs import JobState
from queue_engine.models import Batch, Job

from . import metrics
from .db import get_session


def submit_job(request_body, idempotency_key=None, kind="single", stream=False):
    """Create and enqueue a job for the current key; returns ``(job, created)``.
    A ``stream`` job's worker publishes its text as it is generated."""
    session = get_session()
    settings = current_app.extensions["qe_settings"]
    check_webhook_url(request_body, settings)
    check_quotas(session, quotas.request_waiting(request_body))
    job, created = jobs.create_job(session, g.api_key.id, request_body, settings, idempotency_key, kind=kind,
                                   stream=stream)
    session.commit()
    if created:
        metrics.count_job(job)
        sender().send(jobs=[(job.id, job.model)])
    return job, created


def submit_tribunal(request_body, idempotency_key=None):
    """Create a tribunal and enqueue its first steps; returns ``(job, created)``.

    With ``bypass: auto`` the backlog of its models is read first, and
    decides whether it runs in full or as a single pass.
    """
    session = get_session()
    settings = current_app.extensions["qe_settings"]
    tribunal.check_request(settings, request_body)
    check_webhook_url(request_body, settings)
    readings = None
    if request_body.bypass == "auto":
        readings = load.read_backlog(session, tribunal.models_of(request_body))
    decision = tribunal.decide(request_body.bypass, readings, settings.tribunal.bypass_backlog)
    check_quotas(session, quotas.request_waiting(request_body, 1 if decision.bypassed else len(request_body.candidates)))
    job, steps, created = tribunal.create_tribunal(
        session, g.api_key.id, request_body, settings, decision, idempotency_key)
    first_steps = [(step.id, step.model) for step in steps]
    session.commit()
    if created:
        metrics.count_tribunal(job, steps)
        sender().send(jobs=first_steps)
    return job, created


def check_quotas(session, added):
    """Refuse work the key may not add now (``queue_engine.quotas``): over its
    token budget, or taking it over what it may have waiting. A retry under
    an ``Idempotency-Key`` counts as new work here, so at the limit it waits
    for room like any submission."""
    quotas.check_budget(session, g.api_key)
    quotas.check_waiting(session, g.api_key, added)


def check_webhook_url(request_body, settings):
    """Refuse a ``webhook_url`` the service may not call (``queue_engine.targets``)."""
    if request_body.webhook_url:
        targets.check_url(request_body.webhook_url, settings.webhook_networks)


def submit_batch(request_body, file):
    """Read ``file`` (a werkzeug ``FileStorage``) into a batch; the dispatcher
    sends its chunks, a fair share at a time (``queue_engine.fairshare``).

    The whole file is read in one transaction: a problem with the file
    (:class:`~queue_engine.errors.InvalidFileError`), or a batch that takes
    the key over a quota (``queue_engine.quotas``), rolls everything back.
    """
    session = get_session()
    settings = current_app.extensions["qe_settings"]
    check_webhook_url(request_body, settings)
    quotas.check_budget(session, g.api_key)
    file_format, reader = read_upload(request_body, file, settings)
    # On a problem with the file nothing is committed: the request's session
    # is closed (rolled back) when the request ends.
    batch = batches.create_batch(session, g.api_key.id, settings, request_body, reader,
                                 file_format=file_format, filename=file.filename)
    quotas.check_waiting(session, g.api_key, quotas.batch_waiting(batch), stored=True)
    session.commit()
    metrics.count_batch(batch)
    faults.crash_point(settings, faults.AFTER_COMMIT)  # its rows wait for a dispatcher: nothing lost
    return batch


def cancel_job(job_id):
    """Cancel a job of the current key (an operator: any key's), counting
    what that ended once it is committed: the job, or a tribunal's steps."""
    session = get_session()
    steps = session.scalars(select(Job.id).where(
        Job.parent_id == job_id, Job.status.in_([JobState.QUEUED.value, JobState.RUNNING.value]))).all()
    job = jobs.cancel_job(session, g.api_key.id, job_id, g.api_key.is_operator)
    # Only the cancel that ended the tribunal cancels its steps, so those of
    # its unfinished steps now cancelled are this call's.
    cancelled_steps = session.execute(select(Job.model, Job.lane).where(
        Job.id.in_(steps), Job.status == JobState.CANCELLED.value)).all() if steps else []
    session.commit()
    if job.kind != "tribunal":
        metrics.count_cancelled(job.model, job.lane, "single")
    for model, lane in cancelled_steps:
        metrics.count_cancelled(model, lane, "tribunal_step")
    return job


def cancel_batch(batch_id):
    """Cancel a batch of the current key (an operator: any key's), counting
    the rows that ended with it (its queued rows) once it is committed."""
    session = get_session()
    before = session.scalar(select(Batch.cancelled).where(Batch.id == batch_id)) or 0
    batch = batches.cancel_batch(session, g.api_key.id, batch_id, g.api_key.is_operator)
    session.commit()
    metrics.count_cancelled(batch.model, "bulk", "batch_item", batch.cancelled - before)
    return batch


def preview_batch(request_body, file):
    """A dry run of :func:`submit_batch`: the same checks and the whole file
    read, nothing stored or sent; what it would store, and its prompt tokens
    counted with the model's tokenizer (``batches.preview_batch``)."""
    session = get_session()
    settings = current_app.extensions["qe_settings"]
    check_webhook_url(request_body, settings)
    quotas.check_budget(session, g.api_key)
    file_format, reader = read_upload(request_body, file, settings)
    counter = tokenizers.token_counter(settings, request_body.model) if request_body.model in settings.models else None
    preview = batches.preview_batch(settings, request_body, reader, counter, file_format=file_format)
    quotas.check_waiting(session, g.api_key, quotas.Waiting(preview["runnable_rows"], preview["planned_tokens"]))
    session.rollback()
    return preview


def read_upload(request_body, file, settings):
    """``(file_format, reader)`` for ``file``, once the form's fields fit its format."""
    head = file.stream.read(4096)
    file.stream.seek(0)
    file_format = uploads.detect_format(file.filename, head)
    upload = uploads.Upload.from_request(request_body, settings)
    upload.check_format(file_format)
    return file_format, uploads.read_rows(file.stream, file_format, upload)


def sender():
    """The app's :class:`queue_engine.broker.Sender`."""
    return current_app.extensions["qe_sender"]
