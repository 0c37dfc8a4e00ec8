"""Running jobs under a lease: what a worker does with a job it took.

A worker claims a job (or a chunk's rows) for ``lease_seconds`` and renews the
lease while the engine works; another worker may take the job over only once
the lease has expired, i.e. when its worker died. Finishing is conditional on
still holding the lease, so a late result from a worker that lost its job is
dropped instead of overwriting the new worker's.
"""

import os
import secrets
from datetime import timedelta
from typing import NamedTuple

from sqlalchemy import bindparam, update

from .jobs import JobState, transition, transition_statement
from .models import Job, utcnow


def lease_values(worker, lease_seconds):
    """The columns a claim or a renewal writes: who holds the job, until when."""
    return {"lease_owner": worker, "lease_expires_at": utcnow() + timedelta(seconds=lease_seconds)}


def worker_identity():
    """A name for this worker process that is unique across the cluster."""
    return f"{os.uname().nodename}:{os.getpid()}:{secrets.token_hex(3)}"


class Claim(NamedTuple):
    """What :func:`claim_job` decided: run ``job`` (a row of the jobs table),
    wait ``retry_in`` seconds, or neither. ``gave_up`` says the job was failed
    just now, its attempts used up by workers that died."""

    job: object = None
    retry_in: float = 0.0
    gave_up: bool = False


def claim_job(session, job_id, worker, lease_seconds, max_attempts):
    """Take ``job_id`` for ``worker``, if it is ours to run.

    A queued job is claimed. A running job whose lease expired (its worker
    died) is taken over, or failed once it has used all its attempts. A
    running job with a live lease belongs to a live worker: the caller should
    look again in ``retry_in`` seconds, in case that worker dies too. A
    finished or cancelled job is left alone.
    """
    now = utcnow()
    lease = lease_values(worker, lease_seconds)
    # The common case, a queued job, costs one statement: the hot path of every task.
    claimed = transition(session, job_id, JobState.QUEUED, JobState.RUNNING, returning=True,
                         attempts=Job.attempts + 1, **lease)
    if claimed is not None:
        return Claim(job=claimed)
    job = session.get(Job, job_id, populate_existing=True)
    if job is None or job.status != JobState.RUNNING.value:
        return Claim()
    if job.lease_expires_at is not None and job.lease_expires_at > now:
        return Claim(retry_in=(job.lease_expires_at - now).total_seconds() + 0.5)
    abandoned = Job.lease_expires_at < now
    if job.attempts >= max_attempts:
        gave_up = transition(
            session, job_id, JobState.RUNNING, JobState.FAILED, where=[abandoned],
            error_code="worker_lost",
            error_message=f"the worker running this job was lost {job.attempts} times; giving up",
        )
        return Claim(gave_up=gave_up)
    taken_over = transition(session, job_id, JobState.RUNNING, JobState.RUNNING, where=[abandoned], returning=True,
                            attempts=Job.attempts + 1, **lease)
    return Claim(job=taken_over)


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


def requeue_job(session, job_id, worker, code, message):
    """Give the job back to the queue after a failed attempt, keeping the error."""
    return transition(
        session, job_id, JobState.RUNNING, JobState.QUEUED, where=[Job.lease_owner == worker],
        error_code=code, error_message=message,
    )
