"""Work taken through the run protocol (``queue_engine.leases``) the way a
worker takes it, one item or one chunk at a time, with the outcome given:
for tests that need a job, a step or a batch row in a given state."""

from typing import NamedTuple

from sqlalchemy import select

from queue_engine import leases
from queue_engine.errors import EngineRejectedError
from queue_engine.models import Job

LEASE = 30


class Generated(NamedTuple):
    text: str = "text"
    finish_reason: str = "stop"
    prompt_tokens: int = 1
    completion_tokens: int = 1


def claim_job(session, job_id, worker="w1", lease=LEASE):
    """Claim one job; returns its :class:`~queue_engine.leases.Item`, or None if it was not queued."""
    items = leases.claim(session, worker, lease, job_ids=[job_id])
    return items[0] if items else None


def claim_chunk(session, batch_id, chunk, worker="w1", lease=LEASE):
    """Claim the queued rows of one chunk; returns their items."""
    return leases.claim(session, worker, lease, chunks=[(batch_id, chunk)])


def item_of(session, job_id):
    """The item of a job as a claim returns it (its attempts as stored)."""
    row = session.execute(select(*leases.CLAIMED_COLUMNS).where(Job.id == job_id)).one()
    return leases.Item(**{**row._mapping, "params": row.params or {}})


def succeed(session, settings, job_id, worker="w1", text="text", finish_reason="stop", prompt_tokens=1,
            completion_tokens=1):
    """Finish ``job_id`` with a generation; returns the :class:`~queue_engine.leases.Finished`."""
    outcome = leases.Outcome(item_of(session, job_id), Generated(text, finish_reason, prompt_tokens, completion_tokens))
    return leases.finish(session, worker, [outcome], settings)


def reject(session, settings, job_id, message, worker="w1"):
    """Finish ``job_id`` with an error the engine will always give (it fails for good)."""
    outcome = leases.Outcome(item_of(session, job_id), error=EngineRejectedError(message))
    return leases.finish(session, worker, [outcome], settings)


def break_down(session, settings, job_id, message="boom", worker="w1"):
    """Finish ``job_id`` with an engine error (retried until ``max_attempts``)."""
    outcome = leases.Outcome(item_of(session, job_id), error=RuntimeError(message))
    return leases.finish(session, worker, [outcome], settings)


def send_chunks(session, settings):
    """Mark every pending chunk sent, as the dispatcher does a window at a
    time; returns ``(batch_id, chunk, model)`` of each."""
    from queue_engine import fairshare
    from queue_engine.models import utcnow

    return fairshare.claim_fair_chunks(session, utcnow(), 10**6, settings.batches.chunk_rows)
