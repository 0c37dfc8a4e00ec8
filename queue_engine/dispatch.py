"""The outbox: which waiting work needs a message on the broker, and which
messages the broker lost.

The database is the queue of record; the broker only carries messages that
can be rebuilt from it. Waiting work travels in two kinds of message:

- a single job or tribunal step, one message each on its model's interactive
  queue: the job's ``dispatched_at`` is null until a message carrying it went
  to the broker, and ``retry_at`` holds a retry's message back until its delay
  has passed;
- a chunk of batch rows, one message on the model's bulk queue: a
  :class:`~queue_engine.models.BatchChunk`, ``pending -> sent -> taken``, and
  back to ``pending`` when some of its rows must run again. Chunks are
  stored pending and sent a few at a time, by fair share between keys
  (``queue_engine.fairshare``).

Whoever creates a job (the web, a worker ending a tribunal step) marks it sent
in the transaction that stores it and sends after the commit; if the send
fails it marks it unsent again (:func:`release_jobs`, :func:`release_chunks`).
The dispatcher (``workers/dispatcher.py``) sends whatever is unsent and due,
and repairs the two ways a message disappears after it was sent:

- the broker lost everything (restarted without persistence, flushed, failed
  over to an empty replica): :func:`forget_broker` marks everything it held
  unsent again;
- one message was lost (a crash between commit and send, a worker killed
  between taking a message and recording it): queues are first in, first
  out, so when the database counts more work marked sent than the broker
  holds messages, the oldest of it is what is missing
  (:func:`unaccounted_jobs`, :func:`unaccounted_chunks`).

A message sent twice is harmless, because claims are conditional; what is
never done is to send again everything that waits.
"""

from enum import Enum

from sqlalchemy import func, or_, select, text, tuple_, update

from . import webhooks
from .models import WAITING_ALONE, BatchChunk, Job
from .states import move_statement


class ChunkState(str, Enum):
    PENDING = "pending"
    SENT = "sent"
    TAKEN = "taken"
    DROPPED = "dropped"


#: Which state may follow which. SENT -> SENT is a message sent again after
#: the first was lost; SENT -> PENDING a message the broker lost or that
#: could not be sent; TAKEN -> PENDING rows of the chunk that must run again.
ALLOWED = {
    ChunkState.PENDING: {ChunkState.SENT, ChunkState.DROPPED},
    ChunkState.SENT: {ChunkState.SENT, ChunkState.PENDING, ChunkState.TAKEN, ChunkState.DROPPED},
    ChunkState.TAKEN: {ChunkState.PENDING},
    ChunkState.DROPPED: set(),
}

#: A queued job that travels in a message of its own.
WAITING = text(WAITING_ALONE)


def chunk_transition(sources, target, where, **values):
    """The conditional UPDATE that moves every chunk matching ``where`` from
    one of ``sources`` to ``target`` (``states.move_statement``)."""
    return move_statement(BatchChunk.state, ALLOWED, sources, target, where, values, "chunk")


def claim_due_jobs(session, now, limit):
    """Mark up to ``limit`` unsent, due jobs as sent now, oldest first.

    Returns:
        ``(job_id, model)`` of each, for the caller to send after commit.
        One conditional UPDATE, so two dispatchers never send the same job
        in the same round.
    """
    due = [WAITING, Job.dispatched_at.is_(None), or_(Job.retry_at.is_(None), Job.retry_at <= now)]
    candidates = session.scalars(select(Job.id).where(*due).order_by(Job.created_at).limit(limit)).all()
    if not candidates:
        return []
    return session.execute(
        update(Job).where(Job.id.in_(candidates), *due)
        .values(dispatched_at=now, retry_at=None)
        .returning(Job.id, Job.model)
        .execution_options(synchronize_session=False)
    ).all()


def release_jobs(session, job_ids):
    """Mark jobs whose messages could not be sent as unsent, for the dispatcher."""
    if job_ids:
        session.execute(
            update(Job).where(Job.id.in_(job_ids), WAITING).values(dispatched_at=None)
            .execution_options(synchronize_session=False)
        )


def release_chunks(session, keys):
    """Mark chunks (``(batch_id, chunk)`` pairs) whose messages could not be
    sent, or were lost, as pending, for the dispatcher."""
    by_batch = {}
    for batch_id, chunk in keys:
        by_batch.setdefault(batch_id, []).append(chunk)
    for batch_id, chunks in by_batch.items():
        for start in range(0, len(chunks), 1000):  # within every database's limit on parameters
            session.execute(chunk_transition([ChunkState.SENT], ChunkState.PENDING, [
                BatchChunk.batch_id == batch_id, BatchChunk.chunk.in_(chunks[start:start + 1000])]))


def add_chunks(session, batch_id, model, count):
    """Record the chunks ``0 .. count - 1`` of a new batch, pending: the
    dispatcher sends them a few at a time, by fair share (``queue_engine.fairshare``)."""
    if count:
        session.execute(BatchChunk.__table__.insert(), [
            {"batch_id": batch_id, "chunk": chunk, "model": model, "state": ChunkState.PENDING.value}
            for chunk in range(count)
        ])


def take_chunk(session, batch_id, chunk):
    """A worker took the chunk's message: it is no longer on the broker."""
    session.execute(chunk_transition([ChunkState.SENT], ChunkState.TAKEN,
                                     [BatchChunk.batch_id == batch_id, BatchChunk.chunk == chunk]))


def send_chunks_again(session, keys, retry_at=None):
    """Rows of these taken chunks (``(batch_id, chunk)`` pairs) must run
    again: their chunks need a message again, not before ``retry_at``."""
    if keys:
        session.execute(chunk_transition([ChunkState.TAKEN], ChunkState.PENDING,
                                         [tuple_(BatchChunk.batch_id, BatchChunk.chunk).in_(sorted(keys))],
                                         retry_at=retry_at))


def drop_chunks(session, batch_id):
    """The batch was cancelled: its chunks that have not run need no message."""
    session.execute(chunk_transition([ChunkState.PENDING, ChunkState.SENT], ChunkState.DROPPED,
                                     [BatchChunk.batch_id == batch_id]))


# --- repairing -----------------------------------------------------------------


def forget_broker(session):
    """The broker lost its data: every message it held must be sent again.

    Jobs and chunks it held become unsent; webhook events it held are due
    again at once (instead of after their lease). Work that workers had
    already taken is not touched: it finishes, or its lease expires.

    Returns:
        ``{"jobs": n, "chunks": n, "webhook_events": n}`` made unsent.
    """
    jobs = session.execute(
        update(Job).where(WAITING, Job.dispatched_at.is_not(None)).values(dispatched_at=None)
        .execution_options(synchronize_session=False)).rowcount
    chunks = session.execute(chunk_transition([ChunkState.SENT], ChunkState.PENDING, [])).rowcount
    return {"jobs": jobs, "chunks": chunks, "webhook_events": webhooks.forget_queued(session)}


def unaccounted_jobs(session, model, held, before):
    """Jobs of ``model`` marked sent whose messages the broker seems not to hold.

    Args:
        held: the messages the broker holds on the model's interactive queue,
            read *before* this call, so work taken in between is not
            mistaken for lost.
        before: only jobs sent before this count (a message marked sent a
            moment ago may still be on its way).

    Returns:
        ``{(job_id, dispatched_at)}`` of the oldest jobs marked sent, as many
        as the database counts more than the broker holds. Call it twice a
        while apart: what both calls return is lost.
    """
    sent = [WAITING, Job.model == model, Job.dispatched_at.is_not(None)]
    missing = session.scalar(select(func.count()).select_from(Job).where(*sent)) - held
    if missing <= 0:
        return set()
    rows = session.execute(
        select(Job.id, Job.dispatched_at).where(*sent, Job.dispatched_at < before)
        .order_by(Job.dispatched_at).limit(missing))
    return {(job_id, dispatched_at) for job_id, dispatched_at in rows}


def release_lost_jobs(session, lost):
    """Mark jobs whose messages the broker lost as unsent, each only if it was
    last sent when it was found missing (``(job_id, dispatched_at)`` pairs):
    of several dispatchers that found the same loss, one sends it again."""
    for job_id, dispatched_at in lost:
        session.execute(update(Job).where(Job.id == job_id, Job.dispatched_at == dispatched_at, WAITING)
                        .values(dispatched_at=None).execution_options(synchronize_session=False))


def release_lost_chunks(session, lost):
    """As :func:`release_lost_jobs`, for ``((batch_id, chunk), dispatched_at)`` pairs."""
    for (batch_id, chunk), dispatched_at in lost:
        session.execute(chunk_transition([ChunkState.SENT], ChunkState.PENDING, [
            BatchChunk.batch_id == batch_id, BatchChunk.chunk == chunk, BatchChunk.dispatched_at == dispatched_at]))


def unaccounted_chunks(session, model, held, before):
    """As :func:`unaccounted_jobs`, for ``model``'s chunks on its bulk queue:
    ``{((batch_id, chunk), dispatched_at)}``."""
    sent = [BatchChunk.state == ChunkState.SENT.value, BatchChunk.model == model]
    missing = session.scalar(select(func.count()).select_from(BatchChunk).where(*sent)) - held
    if missing <= 0:
        return set()
    rows = session.execute(
        select(BatchChunk.batch_id, BatchChunk.chunk, BatchChunk.dispatched_at)
        .where(*sent, BatchChunk.dispatched_at < before)
        .order_by(BatchChunk.dispatched_at).limit(missing))
    return {((batch_id, chunk), dispatched_at) for batch_id, chunk, dispatched_at in rows}

