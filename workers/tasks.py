"""The Celery task of the interactive lane. A task claims its job, hands the
request to the engine loop, keeps the job's lease alive while it waits, and
stores the outcome.

A message whose job is not queued (a duplicate, a job that is running
elsewhere, ended or was cancelled) is dropped: claims are conditional, so a
message sent twice runs nothing twice. If this worker dies, its jobs' leases
expire and the dispatcher puts them back in the queue (``queue_engine.recovery``).

A tribunal's steps are jobs too: the transaction that ends a step also
schedules the steps after it (``queue_engine.tribunal``), and the task sends
them once that transaction has committed.

While the database is away (restarting), claims and outcomes are retried
with back-off for ``database_retry_seconds``, so a generation that finished
meanwhile is stored when it returns, not thrown away and run again.
"""

import logging
from concurrent.futures import TimeoutError as FutureTimeout

from queue_engine import jobs, keys, leases, tribunal
from queue_engine.db import try_transaction
from queue_engine.errors import EngineRejectedError

from .engine import GenerationRequest

log = logging.getLogger(__name__)


class JobLostError(Exception):
    """The job stopped being ours while it ran (cancelled, or given to another worker)."""


def register_tasks(app):
    app.task(name=keys.RUN_JOB_TASK, bind=True, shared=False)(run_job)


def run_job(task, job_id):
    """Run one job to an outcome stored in the database."""
    runtime = task.app.qe_runtime
    job = runtime.write(lambda session: claim(session, runtime, job_id))
    if job is None:
        return
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
        record_failure(runtime, job, "engine_rejected", str(e))
        return
    except Exception as e:
        retry_or_fail(runtime, job, f"{type(e).__name__}: {e}")
        return
    end_job(runtime, job, lambda session: leases.complete_job(
        session, job.id, runtime.worker_id, generation.text, generation.finish_reason,
        generation.prompt_tokens, generation.completion_tokens,
    ))


def claim(session, runtime, job_id):
    """Claim the job; a tribunal's step also marks its tribunal running."""
    job = leases.claim_job(session, job_id, runtime.worker_id, runtime.settings.lease_seconds)
    if job is not None and job.parent_id is not None:
        tribunal.step_started(session, job.parent_id)
    return job


def wait_for_generation(runtime, job_id, future):
    """Wait for the engine, renewing the lease every third of its length.

    A renewal the database cannot take (it is restarting) is skipped: the
    next one, or the outcome, is written once it is back.

    Raises:
        JobLostError: the job is no longer ours (cancelled, or its lease
            expired and another worker runs it).
    """
    lease = runtime.settings.lease_seconds
    while True:
        try:
            return future.result(timeout=lease / 3)
        except FutureTimeout:
            ours = try_transaction(runtime.sessions,
                                   lambda session: leases.renew_lease(session, job_id, runtime.worker_id, lease))
            if ours is False:
                raise JobLostError(job_id)


def retry_or_fail(runtime, job, message):
    """An engine error: the job goes back to the queue (its message is sent
    again after ``retry_delay``), or fails once it used every attempt."""
    settings = runtime.settings
    if job.attempts < settings.max_attempts:
        log.warning("job %s attempt %d failed (%s); retrying", job.id, job.attempts, message)
        runtime.write(lambda session: leases.requeue_job(
            session, job.id, runtime.worker_id, "engine_error", message, settings.retry_delay))
    else:
        record_failure(runtime, job, "engine_error", f"failed after {job.attempts} attempts: {message}")


def record_failure(runtime, job, code, message):
    end_job(runtime, job, lambda session: leases.fail_job(session, job.id, runtime.worker_id, code, message))


def end_job(runtime, job, store_outcome):
    """Store ``job``'s outcome with ``store_outcome(session)``, which returns
    whether it ended the job. In the same transaction: if the job is a
    tribunal's step, schedule the steps after it (sent after commit); if it
    has a webhook, record the event."""
    def store(session):
        if not store_outcome(session):
            return []
        if job.parent_id is not None:
            return [(step.id, step.model) for step in tribunal.step_ended(session, job.id, runtime.settings.tribunal)]
        if job.webhook_url:
            jobs.announce_end(session, job.id)
        return []

    next_steps = runtime.write(store)
    if next_steps:
        runtime.sender.send(jobs=next_steps)
