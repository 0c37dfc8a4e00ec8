"""Submitting work: store it, then put its messages on the broker.

Jobs are committed, marked sent, before their messages go out, so a worker
never gets a message for work it cannot see. A batch's rows wait in the
database for the dispatcher, which sends them by fair share between keys.
Accepted means stored: if the broker refuses (or is down), the work is
marked unsent and the answer is still 202; the dispatcher sends it when the broker is back. If this process
dies between the commit and the send, the dispatcher finds the messages
missing from the broker and sends them (``queue_engine.dispatch``).
"""

from flask import current_app, g

from queue_engine import batches, faults, jobs, load, quotas, targets, tokenizers, tribunal, uploads

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
        sender().send(jobs=first_steps)
        metrics.count_tribunal(job)
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
    faults.crash_point(settings, faults.AFTER_COMMIT)  # its rows wait for a dispatcher: nothing lost
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
