"""Batches: the rows of an uploaded file, run as jobs of kind ``batch_item``.

Rows are inserted in bulk and numbered into *chunks*: one bulk-lane message
carries one chunk, so the broker holds about ``rows / chunk_rows`` messages.
Within each window of rows, the rows are sorted by their text before they are
cut into chunks, so rows that share a long prefix (a common instruction) run
together and vLLM's prefix cache can reuse it.

The batch's counts live on the batch row and change in the same transaction
as the row transitions they count, so progress is one primary-key read, and
the transaction that ends the last row also writes the batch's end. Each
chunk is also a row of its own (``dispatch.py``): whether the broker holds its
message, so a lost message can be sent again.
"""

from enum import Enum
from itertools import islice
from typing import NamedTuple

from sqlalchemy import case, func, insert, select, update

from datetime import timedelta

from . import dispatch, webhooks
from .errors import BatchFinishedError, NoSuchBatchError
from .jobs import JobState, check_model_request, new_id, newest_first, transition_statement
from .leases import complete_jobs, fail_job, lease_values
from .models import Batch, Job, utcnow
from .schemas import BatchOut


class BatchState(str, Enum):
    VALIDATING = "validating"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"


#: States in which rows are still running.
ACTIVE = (BatchState.IN_PROGRESS.value, BatchState.CANCELLING.value)

#: Rows are grouped by prefix within windows of this many chunks.
WINDOW_CHUNKS = 32


# --- creating (web side) -------------------------------------------------------


def create_batch(session, owner_id, settings, request, reader, *, file_format, filename):
    """Store a batch and every row the ``reader`` yields, in ``session``'s transaction.

    Rows that cannot run (``row.error``) are stored as failed jobs. The
    chunks are recorded as sent: the caller commits, then sends chunks
    ``0 .. batch.chunks - 1`` (and releases those it could not send). If the
    reader raises (a problem with the file), the caller rolls back and
    nothing is kept.

    Args:
        request: the validated :class:`~queue_engine.schemas.BatchCreate`.
        reader: from :func:`queue_engine.uploads.read_rows`.
    """
    check_model_request(settings, request)
    now = utcnow()
    batch = Batch(
        id=new_id("batch"), owner_id=owner_id, model=request.model, status=BatchState.VALIDATING.value,
        input_format=file_format, filename=filename, id_column=reader.id_header,
        params=request.params.model_dump(), webhook_url=request.webhook_url,
        total=0, completed=0, failed=0, cancelled=0, chunks=0, created_at=now,
    )
    session.add(batch)
    session.flush()
    chunk_rows = settings.batches.chunk_rows
    rows = iter(reader)
    while window := list(islice(rows, chunk_rows * WINDOW_CHUNKS)):
        values = [row_values(batch, row, now) for row in window]
        batch.chunks = assign_chunks(values, window, chunk_rows, batch.chunks)
        session.execute(insert(Job), values)
        batch.total += len(window)
        batch.failed += sum(1 for row in window if row.error)
    # The reader learns from the header which column holds the ids.
    batch.id_column = reader.id_header
    batch.status = BatchState.IN_PROGRESS.value
    session.flush()
    dispatch.add_chunks(session, batch.id, batch.model, batch.chunks, utcnow())
    settle(session, batch.id)
    session.refresh(batch)
    return batch


def row_values(batch, row, now):
    """The jobs-table values of one file row."""
    failed = row.error is not None
    return {
        "id": new_id(), "owner_id": batch.owner_id, "kind": "batch_item", "model": batch.model, "lane": "bulk",
        "status": JobState.FAILED.value if failed else JobState.QUEUED.value,
        "prompt": row.prompt, "messages": row.messages, "params": row.params or {},
        "batch_id": batch.id, "row_index": row.index, "custom_id": row.custom_id, "chunk": None,
        "attempts": 0, "created_at": now, "finished_at": now if failed else None,
        "error_code": row.error[0] if failed else None, "error_message": row.error[1] if failed else None,
    }


def assign_chunks(values, rows, chunk_rows, first_chunk):
    """Number the runnable rows of a window into chunks, rows with equal
    prefixes side by side; returns the next free chunk number."""
    runnable = sorted((i for i, row in enumerate(rows) if row.error is None), key=lambda i: rows[i].text)
    for position, i in enumerate(runnable):
        values[i]["chunk"] = first_chunk + position // chunk_rows
    return first_chunk + -(-len(runnable) // chunk_rows)


# --- reading and cancelling (web side) -----------------------------------------


def get_batch(session, owner_id, batch_id):
    """The batch ``batch_id`` if ``owner_id`` created it.

    Raises:
        NoSuchBatchError: no such batch, or another key's (never tell which).
    """
    batch = session.get(Batch, batch_id, populate_existing=True) if isinstance(batch_id, str) else None
    if batch is None or batch.owner_id != owner_id:
        raise NoSuchBatchError(f"no batch {batch_id!r}")
    return batch


def list_batches(session, owner_id, limit=20, cursor=None):
    """A page of the owner's batches, newest first: ``(batches, next_cursor)``."""
    return newest_first(session, select(Batch).where(Batch.owner_id == owner_id), Batch.id, limit, cursor, "batch_")


def cancel_batch(session, owner_id, batch_id):
    """Cancel every queued row at once; running rows finish, then the batch is ``cancelled``.

    Raises:
        NoSuchBatchError: as :func:`get_batch`.
        BatchFinishedError: the batch already ended.
    """
    batch = get_batch(session, owner_id, batch_id)
    if batch.status not in ACTIVE:
        raise BatchFinishedError(f"batch {batch_id!r} already ended as {batch.status!r}; nothing to cancel")
    cancelled = session.execute(
        transition_statement(JobState.QUEUED, JobState.CANCELLED, [Job.batch_id == batch_id], {})
    ).rowcount
    session.execute(
        update(Batch)
        .where(Batch.id == batch_id, Batch.status.in_(ACTIVE))
        .values(status=BatchState.CANCELLING.value, cancelled=Batch.cancelled + cancelled,
                cancelled_at=func.coalesce(Batch.cancelled_at, utcnow()))
    )
    dispatch.drop_chunks(session, batch_id)
    settle(session, batch_id)
    return get_batch(session, owner_id, batch_id)


def result_rows(session, batch_id):
    """Every row's outcome in input order, streamed from the database."""
    query = (
        select(Job.custom_id, Job.status, Job.result_text, Job.finish_reason, Job.prompt_tokens,
               Job.completion_tokens, Job.error_code, Job.error_message)
        .where(Job.batch_id == batch_id)
        .order_by(Job.row_index)
        .execution_options(yield_per=1000)
    )
    return session.execute(query)


def batch_to_dict(batch):
    """The public batch object (API.md), validated against :class:`BatchOut`."""
    body = {
        "id": batch.id,
        "status": batch.status,
        "model": batch.model,
        "request_counts": {
            "total": batch.total, "completed": batch.completed, "failed": batch.failed, "cancelled": batch.cancelled,
        },
        "created_at": batch.created_at,
        "completed_at": batch.completed_at,
        "cancelled_at": batch.cancelled_at,
        "errors": batch.errors,
        "format": batch.input_format,
        "filename": batch.filename,
        "params": batch.params,
    }
    return BatchOut.model_validate(body).model_dump(mode="json")


# --- running (worker side) -----------------------------------------------------


class ChunkClaim(NamedTuple):
    """What :func:`claim_chunk` took: ``rows`` to run (id, prompt, messages,
    params, attempts) and the batch's ``params`` they start from."""

    rows: list
    params: dict


def claim_chunk(session, batch_id, chunk, worker, lease_seconds):
    """Take the queued rows of ``chunk`` for ``worker``: its message was taken.

    Rows that finished, were cancelled or are running elsewhere are left
    alone, so a chunk's message that arrives twice runs nothing twice.
    """
    dispatch.take_chunk(session, batch_id, chunk)
    batch = session.get(Batch, batch_id)
    if batch is None:
        return ChunkClaim([], {})
    claim = {**lease_values(worker, lease_seconds), "attempts": Job.attempts + 1}
    rows = session.execute(
        transition_statement(JobState.QUEUED, JobState.RUNNING, [Job.batch_id == batch_id, Job.chunk == chunk], claim)
        .returning(Job.id, Job.prompt, Job.messages, Job.params, Job.attempts)
    ).all()
    return ChunkClaim(rows, batch.params)


def renew_leases(session, job_ids, worker, lease_seconds):
    """Extend the leases of ``job_ids`` still running for ``worker``; returns how many."""
    return session.execute(
        update(Job)
        .where(Job.id.in_(job_ids), Job.status == JobState.RUNNING.value, Job.lease_owner == worker)
        .values(lease_expires_at=lease_values(worker, lease_seconds)["lease_expires_at"])
        .execution_options(synchronize_session=False)
    ).rowcount


def record_outcomes(session, batch_id, worker, generations=(), failures=()):
    """Store finished rows and count the ones this worker still held.

    Args:
        generations: ``(job_id, text, finish_reason, prompt_tokens, completion_tokens)``.
        failures: ``(job_id, code, message)`` for rows that failed for good.
    """
    completed = complete_jobs(session, worker, generations)
    failed = sum(fail_job(session, job_id, worker, code, message) for job_id, code, message in failures)
    if completed or failed:
        add_counts(session, batch_id, completed=completed, failed=failed)
    return completed, failed


def requeue_rows(session, batch_id, where, delay=0.0, **values):
    """Put the running rows of ``batch_id`` that match ``where`` back in the
    queue, their chunks to be sent again after ``delay`` seconds; in a batch
    being cancelled they are cancelled instead.

    Returns:
        How many rows went back to the queue (or were cancelled).
    """
    rows = [Job.batch_id == batch_id, *where]
    status = session.scalar(select(Batch.status).where(Batch.id == batch_id))
    if status == BatchState.CANCELLING.value:
        cancelled = session.execute(transition_statement(JobState.RUNNING, JobState.CANCELLED, rows, {})).rowcount
        add_counts(session, batch_id, cancelled=cancelled)
        return cancelled
    chunks = session.execute(
        transition_statement(JobState.RUNNING, JobState.QUEUED, rows, values).returning(Job.chunk)).scalars().all()
    retry_at = utcnow() + timedelta(seconds=delay) if delay else None
    dispatch.send_chunks_again(session, {(batch_id, chunk) for chunk in chunks}, retry_at)
    return len(chunks)


def add_counts(session, batch_id, completed=0, failed=0, cancelled=0):
    """Count rows that just ended (only those whose transition this
    transaction made), and end the batch if they were the last."""
    session.execute(
        update(Batch).where(Batch.id == batch_id)
        .values(completed=Batch.completed + completed, failed=Batch.failed + failed,
                cancelled=Batch.cancelled + cancelled)
    )
    settle(session, batch_id)


def settle(session, batch_id):
    """Write the batch's end if every row has ended.

    One conditional UPDATE, so of many workers finishing rows at once exactly
    one writes it: ``cancelled`` after a cancel, ``failed`` if no row
    succeeded, else ``completed``; the same transaction records the batch's
    webhook event.
    """
    end = case(
        (Batch.status == BatchState.CANCELLING.value, BatchState.CANCELLED.value),
        (Batch.completed == 0, BatchState.FAILED.value),
        else_=BatchState.COMPLETED.value,
    )
    ended = session.execute(
        update(Batch)
        .where(Batch.id == batch_id, Batch.status.in_(ACTIVE),
               Batch.completed + Batch.failed + Batch.cancelled >= Batch.total)
        .values(status=end, completed_at=utcnow())
        .execution_options(synchronize_session=False)
    ).rowcount == 1
    if ended:
        announce_end(session, batch_id)
    return ended


def announce_end(session, batch_id):
    """Record the batch's ``batch.completed``, ``batch.failed`` or
    ``batch.cancelled`` event, if it has a ``webhook_url``."""
    batch = session.get(Batch, batch_id, populate_existing=True)
    if batch.webhook_url:
        webhooks.record_event(session, batch.owner_id, batch.webhook_url, webhooks.BATCH_EVENTS[batch.status],
                              batch_to_dict(batch), batch_id=batch.id)
