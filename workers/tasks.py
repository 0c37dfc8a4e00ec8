"""The Celery tasks. A task claims its job, hands the request to the engine
loop, keeps the job's lease alive while it waits, and stores the outcome.

A tribunal's steps are jobs too: the transaction that ends a step also
schedules the steps after it (``queue_engine.tribunal``), and the task sends
them once that transaction has committed.
"""

import logging
from concurrent.futures import TimeoutError as FutureTimeout

from queue_engine import jobs, keys, leases, tribunal
from queue_engine.db import transaction
from queue_engine.errors import EngineRejectedError

from .engine import GenerationRequest
from .publish import send_job

log = logging.getLogger(__name__)


class JobLostError(Exception):
    """The job stopped being ours while it ran (cancelled, or taken over)."""


def register_tasks(app):
    app.task(name=keys.RUN_JOB_TASK, bind=True, max_retries=None, shared=False)(run_job)


def run_job(task, job_id):
    """Run one job to an outcome stored in the database."""
    runtime = task.app.qe_runtime
    settings = runtime.settings
    with transaction(runtime.sessions) as session:
        claim = leases.claim_job(session, job_id, runtime.worker_id, settings.lease_seconds, settings.max_attempts)
        if claim.job is not None and claim.job.parent_id is not None:
            tribunal.step_started(session, claim.job.parent_id)
        if claim.gave_up:
            # Its workers kept dying. If it was a tribunal's step, the tribunal fails.
            tribunal.step_ended(session, job_id, settings.tribunal)
            jobs.announce_end(session, job_id)
    if claim.retry_in:
        # Another worker holds a live lease; look again when it would expire.
        raise task.retry(countdown=claim.retry_in)
    if claim.job is None:
        return
    job = claim.job
    request = GenerationRequest(
        request_id=f"{job.id}:{job.attempts}", params=job.params, prompt=job.prompt, messages=job.messages,
        lane=job.lane,
    )
    try:
        generation = wait_for_generation(runtime, job.id, runtime.loop.submit(request))
    except JobLostError:
        runtime.loop.abort(request.request_id)
        return
    except EngineRejectedError as e:
        record_failure(task.app, job, "engine_rejected", str(e))
        return
    except Exception as e:
        message = f"{type(e).__name__}: {e}"
        if job.attempts < settings.max_attempts:
            log.warning("job %s attempt %d failed (%s); retrying", job.id, job.attempts, message)
            with transaction(runtime.sessions) as session:
                requeued = leases.requeue_job(session, job.id, runtime.worker_id, "engine_error", message)
            if requeued:
                raise task.retry(countdown=settings.retry_delay) from e
            return
        record_failure(task.app, job, "engine_error", f"failed after {job.attempts} attempts: {message}")
        return
    end_job(task.app, job, lambda session: leases.complete_job(
        session, job.id, runtime.worker_id, generation.text, generation.finish_reason,
        generation.prompt_tokens, generation.completion_tokens,
    ))


def wait_for_generation(runtime, job_id, future):
    """Wait for the engine, renewing the lease every third of its length.

    Raises:
        JobLostError: the lease could not be renewed (the job was cancelled).
    """
    lease = runtime.settings.lease_seconds
    while True:
        try:
            return future.result(timeout=lease / 3)
        except FutureTimeout:
            with transaction(runtime.sessions) as session:
                if not leases.renew_lease(session, job_id, runtime.worker_id, lease):
                    raise JobLostError(job_id) from None


def record_failure(app, job, code, message):
    worker = app.qe_runtime.worker_id
    end_job(app, job, lambda session: leases.fail_job(session, job.id, worker, code, message))


def end_job(app, job, store_outcome):
    """Store ``job``'s outcome with ``store_outcome(session)``, which returns
    whether it ended the job. In the same transaction: if the job is a
    tribunal's step, schedule the steps after it (sent after commit); if it
    has a webhook, record the event."""
    runtime = app.qe_runtime
    with transaction(runtime.sessions) as session:
        next_steps = []
        if store_outcome(session):
            if job.parent_id is not None:
                next_steps = tribunal.step_ended(session, job.id, runtime.settings.tribunal)
            elif job.webhook_url:
                jobs.announce_end(session, job.id)
    for step in next_steps:
        send_job(app, step)
