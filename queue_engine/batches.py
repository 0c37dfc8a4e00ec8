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

from sqlalchemy import and_, case, func, insert, select, true, update

from datetime import timedelta

from . import dispatch, webhooks
from .errors import BatchFinishedError, NoSuchBatchError
from .jobs import JobState, check_model_request, estimate_tokens, new_id, newest_first, transition_statement
from .models import Batch, Job, utcnow
from .schemas import BatchOut
from .states import check_move


class BatchState(str, Enum):
    """A batch's states. API.md also names ``validating`` and ``finalizing``,
    which no one can observe: the upload is one transaction that stores the
    batch ``in_progress``, and the last row's transaction writes its end."""

    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"
    #: A /v1 batch not ended by its ``expires_at`` (``openai_batches.expire_batches``).
    EXPIRED = "expired"


#: Which state may follow which. CANCELLING -> CANCELLING is a second cancel,
#: which counts the queued rows it cancelled (normally none).
ALLOWED = {
    BatchState.IN_PROGRESS: {BatchState.CANCELLING, BatchState.COMPLETED, BatchState.FAILED, BatchState.EXPIRED},
    BatchState.CANCELLING: {BatchState.CANCELLING, BatchState.CANCELLED},
    BatchState.COMPLETED: set(),
    BatchState.FAILED: set(),
    BatchState.CANCELLED: set(),
    BatchState.EXPIRED: set(),
}

#: States in which rows are still running.
ACTIVE = (BatchState.IN_PROGRESS.value, BatchState.CANCELLING.value)

#: How a batch whose rows have all ended ends, the first that fits:
#: ``(from, to, only if)``. :func:`settle` writes it.
ENDINGS = (
    (BatchState.CANCELLING, BatchState.CANCELLED, true()),
    (BatchState.IN_PROGRESS, BatchState.FAILED, Batch.completed == 0),  # no row succeeded
    (BatchState.IN_PROGRESS, BatchState.COMPLETED, true()),
)

#: Rows are grouped by prefix within windows of this many chunks.
WINDOW_CHUNKS = 32


def batch_transition(moves, where, **values):
    """The conditional UPDATE that moves every batch matching ``where`` by
    the first of ``moves`` that fits it; batches in none of their sources
    are left alone.

    Args:
        moves: ``(source, target)`` pairs, or ``(source, target, condition)``
            where the move also needs ``condition`` (a SQL expression).

    Raises:
        InvalidTransitionError: the table does not allow a source -> target.
    """
    sources, branches = [], []
    for source, target, *condition in moves:
        source, target = check_move(ALLOWED, source, target, "batch")
        sources.append(source.value)
        branches.append((and_(Batch.status == source.value, *condition), target.value))
    targets = {target for _, target in branches}
    status = targets.pop() if len(targets) == 1 else case(*branches)
    return (
        update(Batch)
        .where(Batch.status.in_(sorted(set(sources))), *where)
        .values(status=status, **values)
        .execution_options(synchronize_session=False)
    )


# --- creating (web side) -------------------------------------------------------


def create_batch(session, owner_id, settings, request, reader, *, file_format, filename):
    """Store a batch and every row the ``reader`` yields, in ``session``'s transaction.

    Rows that cannot run (``row.error``) are stored as failed jobs. The
    chunks are recorded pending: once committed, the dispatcher sends them
    by fair share between keys (``queue_engine.fairshare``). If the
    reader raises (a problem with the file), the caller rolls back and
    nothing is kept.

    Args:
        request: the validated :class:`~queue_engine.schemas.BatchCreate`.
        reader: from :func:`queue_engine.uploads.read_rows`.
    """
    check_model_request(settings, request)
    now = utcnow()
    batch = Batch(
        id=new_id("batch"), owner_id=owner_id, model=request.model, status=BatchState.IN_PROGRESS.value,
        input_format=file_format, filename=filename, id_column=reader.id_header,
        params=request.params.model_dump(), webhook_url=request.webhook_url,
        options=batch_options(request, reader.upload),
        total=0, completed=0, failed=0, cancelled=0, chunks=0, planned_tokens=0, created_at=now,
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
        batch.planned_tokens += planned_tokens(window, request.params.max_tokens)
    # The reader learns from the header which column holds the ids.
    batch.id_column = reader.id_header
    if reader.upload.keep_columns:
        batch.columns = reader.header
    session.flush()
    dispatch.add_chunks(session, batch.id, batch.model, batch.chunks)
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
        "cells": row.cells,
    }


def batch_options(request, upload):
    """``Batch.options``: how the rows were made (the upload's CSV-only
    fields) and how the results read (``samples``), or None when the
    request set none of them."""
    options = dict(upload.options or {})
    if "samples" in request.model_fields_set:
        options["samples"] = request.samples
    return options or None


#: How many rows a dry run shows, and how many of its row errors.
PREVIEW_ROWS = 5
PREVIEW_ERRORS = 10


def preview_batch(settings, request, reader, count_tokens, *, file_format):
    """What the upload would store, read in full and checked as
    :func:`create_batch` checks it, with nothing stored (a dry run).

    Args:
        count_tokens: ``(rows) -> (tokens, tokenizer_error)``, the prompt
            tokens of runnable rows (``queue_engine.tokenizers``).

    Raises:
        InvalidFileError: as :func:`create_batch`, at the first problem with the file.
    """
    check_model_request(settings, request)
    total = failed = planned = tokens = 0
    first_rows, errors, tokenizer_error = [], [], None
    rows = iter(reader)
    while window := list(islice(rows, 1000)):
        for row in window:
            if len(first_rows) < PREVIEW_ROWS:
                first_rows.append({"id": row.custom_id, "prompt": row.prompt, "messages": row.messages,
                                   "params": row.params or {},
                                   "error": {"code": row.error[0], "message": row.error[1]} if row.error else None})
            if row.error and len(errors) < PREVIEW_ERRORS:
                errors.append({"line": row.line, "id": row.custom_id, "code": row.error[0], "message": row.error[1]})
        runnable = [row for row in window if row.error is None]
        total += len(window)
        failed += len(window) - len(runnable)
        planned += planned_tokens(runnable, request.params.max_tokens)
        counted, tokenizer_error = count_tokens(runnable)
        tokens += counted
    return {
        "dry_run": True, "model": request.model, "format": file_format,
        "rows": total, "runnable_rows": total - failed, "failed_rows": failed, "row_errors": errors,
        "prompt_tokens": tokens, "tokens_counted_with": "estimate" if tokenizer_error else "tokenizer",
        "tokenizer_error": tokenizer_error, "planned_tokens": planned,
        "columns": reader.header, "options": batch_options(request, reader.upload), "first_rows": first_rows,
    }


def planned_tokens(rows, batch_max_tokens):
    """The estimated tokens of the runnable ``rows`` (``jobs.estimate_tokens``),
    a row's own ``max_tokens`` winning over the batch's."""
    return sum(estimate_tokens(row.prompt, row.messages, (row.params or {}).get("max_tokens", batch_max_tokens))
               for row in rows if row.error is None)


def assign_chunks(values, rows, chunk_rows, first_chunk):
    """Number the runnable rows of a window into chunks, rows with equal
    prefixes side by side; returns the next free chunk number."""
    runnable = sorted((i for i, row in enumerate(rows) if row.error is None), key=lambda i: rows[i].text)
    for position, i in enumerate(runnable):
        values[i]["chunk"] = first_chunk + position // chunk_rows
    return first_chunk + -(-len(runnable) // chunk_rows)


# --- reading and cancelling (web side) -----------------------------------------


def get_batch(session, owner_id, batch_id, operator=False):
    """The batch ``batch_id`` if ``owner_id`` created it, or any key's for an ``operator``.

    Raises:
        NoSuchBatchError: no such batch, or another key's (never tell which).
    """
    batch = session.get(Batch, batch_id, populate_existing=True) if isinstance(batch_id, str) else None
    if batch is None or (batch.owner_id != owner_id and not operator):
        raise NoSuchBatchError(f"no batch {batch_id!r}")
    return batch


def list_batches(session, owner_id, limit=20, cursor=None):
    """A page of the owner's batches, newest first: ``(batches, next_cursor)``."""
    return newest_first(session, select(Batch).where(Batch.owner_id == owner_id), Batch.id, limit, cursor, "batch_")


def cancel_batch(session, owner_id, batch_id, operator=False):
    """Cancel every queued row at once; running rows finish, then the batch is ``cancelled``.

    Raises:
        NoSuchBatchError: as :func:`get_batch` (an ``operator`` may cancel any key's).
        BatchFinishedError: the batch already ended.
    """
    batch = get_batch(session, owner_id, batch_id, operator)
    if batch.status not in ACTIVE:
        raise BatchFinishedError(f"batch {batch_id!r} already ended as {batch.status!r}; nothing to cancel")
    cancelled = session.execute(
        transition_statement(JobState.QUEUED, JobState.CANCELLED, [Job.batch_id == batch_id], {})
    ).rowcount
    session.execute(batch_transition(
        [(BatchState.IN_PROGRESS, BatchState.CANCELLING), (BatchState.CANCELLING, BatchState.CANCELLING)],
        [Batch.id == batch_id],
        cancelled=Batch.cancelled + cancelled, cancelled_at=func.coalesce(Batch.cancelled_at, utcnow())))
    dispatch.drop_chunks(session, batch_id)
    settle(session, batch_id)
    return get_batch(session, owner_id, batch_id, operator)


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
        "usage": {
            "prompt_tokens": batch.prompt_tokens or 0, "completion_tokens": batch.completion_tokens or 0,
            "total_tokens": (batch.prompt_tokens or 0) + (batch.completion_tokens or 0),
            "engine_seconds": batch.engine_seconds or 0.0,
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


# --- rows that ended or must run again (worker and dispatcher side) -----------


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
    one writes it: the first of :data:`ENDINGS` that fits (``cancelled``
    after a cancel, ``failed`` if no row succeeded, else ``completed``); the
    same transaction records the batch's webhook event.
    """
    ended = session.execute(batch_transition(
        ENDINGS, [Batch.id == batch_id, Batch.completed + Batch.failed + Batch.cancelled >= Batch.total],
        completed_at=utcnow())
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
