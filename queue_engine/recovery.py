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
lost it is dropped (``leases.finish`` checks the owner).
"""

from typing import NamedTuple

from sqlalchemy import select

from . import batches, leases
from .jobs import JobState, transition_statement
from .models import Job


class Recovered(NamedTuple):
    """What one look found: jobs and batch rows put back in the queue, and failed for good."""

    requeued: int = 0
    failed: int = 0


def recover_abandoned(session, settings, now):
    """Requeue or fail every running job and batch row whose lease expired before ``now``."""
    expired = Job.lease_expires_at < now
    lost = session.execute(
        select(Job.id, Job.batch_id, Job.parent_id, Job.webhook_url, Job.attempts)
        .where(Job.status == JobState.RUNNING.value, expired)
    ).all()
    spent = [item for item in lost if item.attempts >= settings.max_attempts]
    failed = fail_lost(session, spent, expired, settings)
    requeued = 0
    rows_by_batch, job_ids = {}, []
    for item in lost:
        if item.attempts < settings.max_attempts:
            if item.batch_id is None:
                job_ids.append(item.id)
            else:
                rows_by_batch.setdefault(item.batch_id, []).append(item.id)
    if job_ids:
        requeued += session.execute(
            transition_statement(JobState.RUNNING, JobState.QUEUED, [Job.id.in_(job_ids), expired], {})).rowcount
    for batch_id, row_ids in rows_by_batch.items():
        requeued += batches.requeue_rows(session, batch_id, [Job.id.in_(row_ids), expired])
    return Recovered(requeued, failed)


def fail_lost(session, items, expired, settings):
    """Fail ``items``, whose workers died ``max_attempts`` times, with what
    their end implies (``leases.after_end``): a batch's counts, a tribunal
    failing, a webhook event. Returns how many this call failed."""
    if not items:
        return 0
    failed = set(session.execute(
        transition_statement(JobState.RUNNING, JobState.FAILED, [Job.id.in_([item.id for item in items]), expired], {
            "error_code": "worker_lost",
            "error_message": f"the worker running this job was lost {settings.max_attempts} times; giving up",
        }).returning(Job.id)).scalars())
    leases.after_end(session, [(item, JobState.FAILED) for item in items if item.id in failed], settings)
    return len(failed)
