"""Running work under a lease: the one protocol for every kind of work.

A single job, a tribunal's step and a batch's rows are all jobs, and a
worker runs them all the same way, in sets:

1. :func:`claim` takes a set of queued items (jobs by id, batch rows by
   chunk) in one transaction, under the worker's lease;
2. :func:`renew` extends the leases of everything the worker holds in one
   statement, and says which items it no longer holds (cancelled, or given to
   another worker after its lease expired), so their generation is stopped;
3. :func:`finish` stores a set of outcomes in one transaction and everything
   an outcome implies: the retry policy, the batch counts, tokens and engine
   time and the batch's end, the key's usage (``usage.py``), a tribunal's
   next steps, the webhook events. It returns the work to send once that
   transaction has committed.

A single job is a set of one; a worker groups what arrives together, so one
transaction claims, renews or finishes many items. Claims take queued work
only: deciding that a worker is dead, because it stopped renewing, is the
dispatcher's (``recovery.py``), which puts the work back in the queue.
Finishing is conditional on still holding the item, so a late result from a
worker that lost it is dropped instead of overwriting the new worker's.
"""

import os
import secrets
from datetime import datetime, timedelta
from typing import NamedTuple

from sqlalchemy import JSON, bindparam, select, update

from . import batches, jobs, structured, tribunal, usage
from .dispatch import take_chunk
from .errors import EngineRejectedError
from .jobs import JobState, transition_statement
from .models import ApiKey, Batch, Job, utcnow

#: What a worker needs of an item it claimed.
CLAIMED_COLUMNS = (Job.id, Job.model, Job.lane, Job.prompt, Job.messages, Job.params, Job.attempts,
                   Job.batch_id, Job.chunk, Job.parent_id, Job.webhook_url, Job.stream, Job.owner_id,
                   Job.created_at, Job.started_at)


class Item(NamedTuple):
    """An item a worker claimed and runs: a single job, a step or a batch row.
    ``params`` are the row's own over its batch's."""

    id: str
    model: str
    lane: str
    prompt: str | None
    messages: list | None
    params: dict
    attempts: int
    batch_id: str | None = None
    chunk: int | None = None
    parent_id: str | None = None
    webhook_url: str | None = None
    #: Its reader wants the text as it is generated (``queue_engine.streams``).
    stream: bool = False
    owner_id: int | None = None
    #: Its key's share of the bulk lane (batch rows only; ``queue_engine.fairshare``).
    share: float = 1.0
    #: When it was submitted and first started (for the worker's latency metrics).
    created_at: datetime | None = None
    started_at: datetime | None = None

    @property
    def request_id(self):
        """The engine's id for this attempt: a retry is a new request."""
        return f"{self.id}:{self.attempts}"


class Outcome(NamedTuple):
    """How one attempt ended: a ``generation`` (text, finish_reason,
    prompt_tokens, completion_tokens; ``output`` and ``engine_seconds`` where
    it has them), or the ``error`` the engine raised."""

    item: Item
    generation: object = None
    error: BaseException | None = None


class Finished(NamedTuple):
    """What :func:`finish` did: the ids of items that ended and of items given
    back after an engine error (to the queue; in a batch being cancelled, to
    its cancelled rows). Outcomes of items the worker no longer held are in
    neither, and ``next_jobs``, ``(job_id, model)`` of work it created (a
    tribunal's next steps), to send once the transaction has committed.
    ``failed``: the ids among ``ended`` that failed (the others succeeded)."""

    ended: list
    requeued: list
    next_jobs: list
    failed: list = ()


def worker_identity():
    """A name for this worker process that is unique across the cluster."""
    return f"{os.uname().nodename}:{os.getpid()}:{secrets.token_hex(3)}"


def lease_values(worker, lease_seconds):
    """The columns a claim or a renewal writes: who holds the job, until when."""
    return {"lease_owner": worker, "lease_expires_at": utcnow() + timedelta(seconds=lease_seconds)}


# --- claiming ------------------------------------------------------------------


def claim(session, worker, lease_seconds, job_ids=(), chunks=()):
    """Take the queued items among ``job_ids`` and the ``(batch_id, chunk)``
    chunks for ``worker``.

    Items that are not queued (a duplicate message, an item running
    elsewhere, finished or cancelled) are left alone, so a message that
    arrives twice runs nothing twice. A tribunal whose step is claimed is
    running from then on.

    Returns:
        The claimed :class:`Item` s.
    """
    rows = []
    if job_ids:
        rows += _claim_where(session, worker, lease_seconds, [Job.id.in_(list(job_ids))])
        tribunals = {row.parent_id for row in rows if row.parent_id is not None}
        if tribunals:
            session.execute(transition_statement(JobState.QUEUED, JobState.RUNNING, [Job.id.in_(tribunals)], {}))
    for batch_id, chunk in chunks:
        take_chunk(session, batch_id, chunk)
        rows += _claim_where(session, worker, lease_seconds, [Job.batch_id == batch_id, Job.chunk == chunk])
    batch_params = _batch_params(session, {row.batch_id for row in rows if row.batch_id is not None})
    shares = _shares(session, {row.owner_id for row in rows if row.batch_id is not None})
    return [
        Item(**{**row._mapping, "params": {**batch_params.get(row.batch_id, {}), **(row.params or {})},
                "share": shares.get(row.owner_id, 1.0)})
        for row in rows
    ]


def _claim_where(session, worker, lease_seconds, where):
    values = {"attempts": Job.attempts + 1, **lease_values(worker, lease_seconds)}
    return session.execute(
        transition_statement(JobState.QUEUED, JobState.RUNNING, where, values).returning(*CLAIMED_COLUMNS)
    ).all()


def _batch_params(session, batch_ids):
    if not batch_ids:
        return {}
    return dict(session.execute(select(Batch.id, Batch.params).where(Batch.id.in_(batch_ids))).all())


def _shares(session, owner_ids):
    if not owner_ids:
        return {}
    return dict(session.execute(select(ApiKey.id, ApiKey.share).where(ApiKey.id.in_(owner_ids))).all())


# --- renewing ------------------------------------------------------------------


def renew(session, worker, job_ids, lease_seconds):
    """Extend the leases of ``job_ids`` that ``worker`` still holds.

    Returns:
        The ids it no longer holds (cancelled, or taken back after its lease
        expired): their generation should stop.
    """
    job_ids = list(job_ids)
    if not job_ids:
        return set()
    held = session.execute(
        update(Job)
        .where(Job.id.in_(job_ids), Job.status == JobState.RUNNING.value, Job.lease_owner == worker)
        .values(lease_expires_at=lease_values(worker, lease_seconds)["lease_expires_at"])
        .returning(Job.id)
        .execution_options(synchronize_session=False)
    ).scalars()
    return set(job_ids) - set(held)


# --- finishing -----------------------------------------------------------------


def finish(session, worker, outcomes, settings):
    """Store ``outcomes`` of items ``worker`` holds, in ``session``'s transaction.

    Each outcome is one of: a generation (the item succeeds); an error the
    engine will always give (``EngineRejectedError``: the item fails); any
    other error (the item goes back to the queue, its message sent again
    after ``retry_delay``, or fails after ``max_attempts``). Outcomes of items
    the worker no longer holds are dropped. Then, for the items that ended:
    batch counts (and the batch's end), tribunal steps, webhook events; and
    for each generation, its tokens and engine seconds on its batch and in its
    key's usage of the day (:func:`queue_engine.usage.record`). Failed items
    count in neither: they bring no generation, so no tokens (an engine
    error or a rejection reports none, and the engine time of an attempt
    that failed or was aborted is not known per request).

    A generation whose ``response_format`` is checked (json_schema, choice,
    regex: :mod:`queue_engine.structured`) has its answer parsed here: the
    parsed answer goes to ``Job.output["parsed"]`` (a list, one per sample,
    when ``n`` > 1). If any sample does not parse or validate, the item fails
    with ``invalid_answer``, keeping its text, tokens and the samples that
    did parse; its tokens count in its key's usage (the engine ran them) but
    not in its batch's, which sums succeeded rows.

    Returns:
        :class:`Finished`.
    """
    outcomes = list({outcome.item.id: outcome for outcome in outcomes}.values())  # each item once
    held = _hold(session, worker, [outcome.item.id for outcome in outcomes])  # id -> owner id
    now = utcnow()
    succeeded, invalid, failed, retried = [], [], [], []
    for outcome in outcomes:
        if outcome.item.id not in held:
            continue
        if outcome.error is None:
            checked = check_answer(outcome)
            (succeeded if checked.error is None else invalid).append(checked)
        elif isinstance(outcome.error, EngineRejectedError):
            failed.append((outcome.item, "engine_rejected", str(outcome.error)))
        elif outcome.item.attempts < settings.max_attempts:
            retried.append((outcome.item, f"{type(outcome.error).__name__}: {outcome.error}"))
        else:
            failed.append((outcome.item, "engine_error",
                           f"failed after {outcome.item.attempts} attempts: {type(outcome.error).__name__}: "
                           f"{outcome.error}"))
    _store_generations(session, succeeded, now)
    _add_batch_usage(session, succeeded)
    _store_failures(session, failed)
    _store_generations(session, invalid, now, JobState.FAILED)
    for item, message in retried:
        _retry(session, worker, item, message, settings.retry_delay)
    ended = ([(o.item, JobState.SUCCEEDED) for o in succeeded] + [(o.item, JobState.FAILED) for o in invalid]
             + [(item, JobState.FAILED) for item, _, _ in failed])
    next_jobs = after_end(session, ended, settings)
    # Last, in one order (usage.add_up), so that usage rows never wait on rows
    # another finish locks after its own usage rows: no deadlock on PostgreSQL.
    usage.record(session, [usage.Increment(
        held[o.item.id], o.item.model, now.date(), 1, o.generation.prompt_tokens, o.generation.completion_tokens,
        engine_seconds(o.generation)) for o in succeeded + invalid])
    return Finished([item.id for item, _ in ended], [item.id for item, _ in retried], next_jobs,
                    [item.id for item, state in ended if state == JobState.FAILED])


def _hold(session, worker, job_ids):
    """The ids among ``job_ids`` that ``worker`` still runs, locked for this
    transaction, so the writes that follow all apply; each with its owner's id.

    PostgreSQL locks them with ``FOR NO KEY UPDATE`` (an UPDATE here would
    make the next UPDATE of the same rows check their foreign keys, taking a
    share lock on a tribunal's row that deadlocks with a sibling step's
    ``step_ended``). SQLite has no row locks and starts its transaction at
    the first write, so there the lock is a write that changes nothing.
    """
    if not job_ids:
        return {}
    mine = [Job.id.in_(job_ids), Job.status == JobState.RUNNING.value, Job.lease_owner == worker]
    if session.get_bind().dialect.name == "postgresql":
        return dict(session.execute(select(Job.id, Job.owner_id).where(*mine).with_for_update(key_share=True)).all())
    return dict(session.execute(
        update(Job).where(*mine).values(lease_owner=worker).returning(Job.id, Job.owner_id)
        .execution_options(synchronize_session=False)
    ).all())


def engine_seconds(generation):
    """The generation's engine seconds; 0 for one that does not know them."""
    return getattr(generation, "engine_seconds", None) or 0.0


class Checked(NamedTuple):
    """A generation with its answer checked: ``output`` to store, and why the answer is invalid (or None)."""

    item: Item
    generation: object
    output: dict | None
    error: str | None = None


def check_answer(outcome):
    """Parse and check the answer(s) of a generation whose ``response_format`` asks it
    (:func:`queue_engine.structured.parse_answer`), each sample's when ``n`` > 1."""
    generation = outcome.generation
    output = getattr(generation, "output", None)
    response_format = outcome.item.params.get("response_format")
    if not structured.is_checked(response_format):
        return Checked(outcome.item, generation, output)
    samples = (output or {}).get("choices")
    texts = [choice["text"] for choice in samples] if samples else [generation.text]
    parsed, errors = structured.parse_answers(response_format, texts)
    output = {**(output or {}), "parsed": parsed if samples else parsed[0]}
    wrong = [(index, error) for index, error in enumerate(errors) if error is not None]
    if not wrong:
        return Checked(outcome.item, generation, output)
    if samples:
        output["answer_errors"] = errors
        message = "; ".join(f"sample {index}: {error}" for index, error in wrong)
        message = f"{len(wrong)} of {len(texts)} samples invalid: {message}"
    else:
        message = wrong[0][1]
    return Checked(outcome.item, generation, output, message)


def _store_generations(session, outcomes, now, state=JobState.SUCCEEDED):
    """Store checked generations: succeeded, or failed with ``invalid_answer`` (``state`` FAILED)."""
    if not outcomes:
        return
    statement = transition_statement(JobState.RUNNING, state, [Job.id == bindparam("b_id")], {
        "result_text": bindparam("b_text"), "finish_reason": bindparam("b_finish"),
        "prompt_tokens": bindparam("b_prompt"), "completion_tokens": bindparam("b_completion"),
        "output": bindparam("b_output", type_=JSON(none_as_null=True)),
        "error_code": None if state == JobState.SUCCEEDED else structured.INVALID_ANSWER,
        "error_message": bindparam("b_error"),
        "engine_seconds": bindparam("b_engine"),
        # The day its usage is counted on is this one's (UTC).
        "finished_at": now,
    }).execution_options(dml_strategy="core_only")
    session.execute(statement, [
        {"b_id": o.item.id, "b_text": o.generation.text, "b_finish": o.generation.finish_reason,
         "b_prompt": o.generation.prompt_tokens, "b_completion": o.generation.completion_tokens,
         # n > 1 choices and logprobs, only when the job asked (Generation.output), and a
         # structured answer parsed (check_answer); None otherwise.
         "b_output": o.output, "b_error": o.error,
         "b_engine": getattr(o.generation, "engine_seconds", None)}
        for o in outcomes
    ])


def _add_batch_usage(session, outcomes):
    """Add the generations' tokens and engine seconds to their batches, so a
    batch's totals are one primary-key read, while it runs and after.

    Batches in id order, so transactions finishing rows of the same batches
    lock them in one order."""
    sums = {}
    for o in outcomes:
        if o.item.batch_id is not None:
            prompt, completion, seconds = sums.get(o.item.batch_id, (0, 0, 0.0))
            sums[o.item.batch_id] = (prompt + o.generation.prompt_tokens,
                                     completion + o.generation.completion_tokens,
                                     seconds + engine_seconds(o.generation))
    for batch_id in sorted(sums):
        prompt, completion, seconds = sums[batch_id]
        session.execute(update(Batch).where(Batch.id == batch_id).values(
            prompt_tokens=Batch.prompt_tokens + prompt, completion_tokens=Batch.completion_tokens + completion,
            engine_seconds=Batch.engine_seconds + seconds).execution_options(synchronize_session=False))


def _store_failures(session, failures):
    if not failures:
        return
    statement = transition_statement(JobState.RUNNING, JobState.FAILED, [Job.id == bindparam("b_id")], {
        "error_code": bindparam("b_code"), "error_message": bindparam("b_message"),
    }).execution_options(dml_strategy="core_only")
    session.execute(statement, [{"b_id": item.id, "b_code": code, "b_message": message}
                                for item, code, message in failures])


def _retry(session, worker, item, message, delay):
    """Give a failed attempt back to the queue, keeping its error."""
    values = {"error_code": "engine_error", "error_message": message}
    if item.batch_id is not None:
        # The row's chunk gets a message again; in a batch being cancelled, the row is cancelled.
        batches.requeue_rows(session, item.batch_id, [Job.id == item.id, Job.lease_owner == worker], delay, **values)
    else:
        session.execute(transition_statement(
            JobState.RUNNING, JobState.QUEUED, [Job.id == item.id, Job.lease_owner == worker],
            {**values, "retry_at": utcnow() + timedelta(seconds=delay)}))


def after_end(session, ended, settings):
    """What items that just ended imply, in the transaction that ended them.

    Args:
        ended: ``(item, state)`` pairs: an item (anything with ``id``,
            ``batch_id``, ``parent_id``, ``webhook_url``) whose move to the
            end ``state`` this transaction made.

    Returns:
        ``(job_id, model)`` of the tribunal steps that follow, to send after commit.
    """
    counts = {}
    next_steps = []
    for item, state in ended:
        if item.batch_id is not None:
            batch_counts = counts.setdefault(item.batch_id, {"completed": 0, "failed": 0})
            batch_counts["completed" if state == JobState.SUCCEEDED else "failed"] += 1
        elif item.parent_id is not None:
            next_steps += tribunal.step_ended(session, item.id, settings.tribunal)
        elif item.webhook_url:
            jobs.announce_end(session, item.id)
    for batch_id, batch_counts in counts.items():
        batches.add_counts(session, batch_id, **batch_counts)
    return [(step.id, step.model) for step in next_steps]
