"""Running jobs under a lease: what a worker does with a job it took.

A worker claims a queued job (or a chunk's queued rows) for ``lease_seconds``
and renews the lease while the engine works. Claims take queued work only:
deciding that a worker is dead, because it stopped renewing, is the
dispatcher's job (``recovery.py``), which puts the work back in the queue.
Finishing is conditional on still holding the job, so a late result from a
worker that lost it is dropped instead of overwriting the new worker's.
"""

import os
import secrets
from datetime import timedelta

from sqlalchemy import bindparam, update

from .jobs import JobState, transition, transition_statement
from .models import Job, utcnow


def lease_values(worker, lease_seconds):
    """The columns a claim or a renewal writes: who holds the job, until when."""
    return {"lease_owner": worker, "lease_expires_at": utcnow() + timedelta(seconds=lease_seconds)}


def worker_identity():
    """A name for this worker process that is unique across the cluster."""
    return f"{os.uname().nodename}:{os.getpid()}:{secrets.token_hex(3)}"


def claim_job(session, job_id, worker, lease_seconds):
    """Take ``job_id`` for ``worker`` if it is queued.

    Returns:
        The job's row, now running under ``worker``'s lease; or None when it
        is not queued (a duplicate message, a job that is running, finished
        or cancelled), and the message should be dropped.
    """
    return transition(session, job_id, JobState.QUEUED, JobState.RUNNING, returning=True,
                      attempts=Job.attempts + 1, **lease_values(worker, lease_seconds))


def renew_lease(session, job_id, worker, lease_seconds):
    """Extend the lease; False means the job is no longer ours (e.g. cancelled)."""
    statement = (
        update(Job)
        .where(Job.id == job_id, Job.status == JobState.RUNNING.value, Job.lease_owner == worker)
        .values(lease_expires_at=utcnow() + timedelta(seconds=lease_seconds))
        .execution_options(synchronize_session=False)
    )
    return session.execute(statement).rowcount == 1


def complete_job(session, job_id, worker, text, finish_reason, prompt_tokens, completion_tokens):
    """Store the result; False if the job was cancelled or taken over meanwhile."""
    return complete_jobs(session, worker, [(job_id, text, finish_reason, prompt_tokens, completion_tokens)]) == 1


def complete_jobs(session, worker, results):
    """Store many results in one statement (executed for each), as
    :func:`complete_job` does for one.

    Args:
        results: ``(job_id, text, finish_reason, prompt_tokens, completion_tokens)`` tuples.

    Returns:
        How many of the jobs were still this worker's to complete.
    """
    if not results:
        return 0
    statement = transition_statement(
        JobState.RUNNING, JobState.SUCCEEDED, [Job.id == bindparam("b_id"), Job.lease_owner == worker], {
            "result_text": bindparam("b_text"), "finish_reason": bindparam("b_finish"),
            "prompt_tokens": bindparam("b_prompt"), "completion_tokens": bindparam("b_completion"),
            "error_code": None, "error_message": None,
        },
    ).execution_options(dml_strategy="core_only")
    names = ("b_id", "b_text", "b_finish", "b_prompt", "b_completion")
    return session.execute(statement, [dict(zip(names, result)) for result in results]).rowcount


def fail_job(session, job_id, worker, code, message):
    """Fail the job for good (no retry)."""
    return transition(
        session, job_id, JobState.RUNNING, JobState.FAILED, where=[Job.lease_owner == worker],
        error_code=code, error_message=message,
    )


def requeue_job(session, job_id, worker, code, message, delay):
    """Give the job back to the queue after a failed attempt, keeping the
    error; its message is sent again once ``delay`` seconds have passed."""
    return transition(
        session, job_id, JobState.RUNNING, JobState.QUEUED, where=[Job.lease_owner == worker],
        error_code=code, error_message=message, retry_at=utcnow() + timedelta(seconds=delay),
    )
