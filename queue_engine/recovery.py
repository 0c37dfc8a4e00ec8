"""Work whose worker died: found by its lease, put back in the queue.

A running job's worker renews its lease every third of ``lease_seconds``.
A lease that has expired means the worker stopped: it was killed, its node
died, or it lost the database. The dispatcher calls :func:`recover_abandoned`
every few seconds, so such work runs again within about one lease of the
worker's last renewal, instead of after the broker's visibility timeout:

- a job or batch row that still has attempts left goes back to ``queued``,
  and gets a message again (a batch row through its chunk);
- one that has used ``max_attempts`` fails as ``worker_lost`` (a job that
  keeps killing its worker must not loop), with what that failure implies:
  the batch's counts, the tribunal failing, the webhook event.

Each change is conditional on the lease still being expired, so a worker
that renews at the last moment keeps its work, and a late result of one that
lost it is dropped (``leases.complete_jobs`` checks the owner).
"""

from typing import NamedTuple

from sqlalchemy import select

from . import batches, jobs, tribunal
from .jobs import JobState, transition
from .models import Job


class Recovered(NamedTuple):
    """What one look found: jobs and batch rows put back in the queue, and failed for good."""

    requeued: int = 0
    failed: int = 0


def recover_abandoned(session, settings, now):
    """Requeue or fail every running job and batch row whose lease expired before ``now``."""
    expired = Job.lease_expires_at < now
    rows = session.execute(
        select(Job.id, Job.batch_id, Job.attempts).where(Job.status == JobState.RUNNING.value, expired)
    ).all()
    requeued = failed = 0
    lost_rows = {}
    for job_id, batch_id, attempts in rows:
        if batch_id is not None:
            lost_rows.setdefault(batch_id, []).append(job_id)
        elif attempts >= settings.max_attempts:
            failed += fail_lost_job(session, job_id, attempts, expired, settings)
        else:
            requeued += transition(session, job_id, JobState.RUNNING, JobState.QUEUED, where=[expired])
    for batch_id, job_ids in lost_rows.items():
        row_requeued, row_failed = recover_rows(session, batch_id, job_ids, expired, settings.max_attempts)
        requeued, failed = requeued + row_requeued, failed + row_failed
    return Recovered(requeued, failed)


def fail_lost_job(session, job_id, attempts, expired, settings):
    """A job whose workers died ``attempts`` times fails; a tribunal whose
    step it was fails with it. Returns 1 if this call failed it."""
    ended = transition(
        session, job_id, JobState.RUNNING, JobState.FAILED, where=[expired], error_code="worker_lost",
        error_message=f"the worker running this job was lost {attempts} times; giving up",
    )
    if ended:
        tribunal.step_ended(session, job_id, settings.tribunal)
        jobs.announce_end(session, job_id)
    return int(ended)


def recover_rows(session, batch_id, job_ids, expired, max_attempts):
    """Fail the lost rows of a batch that used every attempt; requeue the rest."""
    rows = [Job.id.in_(job_ids), expired]
    failed = session.execute(jobs.transition_statement(
        JobState.RUNNING, JobState.FAILED, [Job.batch_id == batch_id, *rows, Job.attempts >= max_attempts], {
            "error_code": "worker_lost",
            "error_message": f"the worker running this row was lost {max_attempts} times; giving up",
        })).rowcount
    if failed:
        batches.add_counts(session, batch_id, failed=failed)
    return batches.requeue_rows(session, batch_id, rows), failed
