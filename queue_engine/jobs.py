"""The job life cycle: create, claim, finish, retry, cancel, read.

Every state change is one conditional UPDATE made by :func:`transition`
(``... WHERE status = <expected>``), so a redelivered message never runs a
finished job again and a cancelled job never starts. A running job holds a
lease that its worker renews; another worker may take it over only once the
lease has expired, i.e. when its worker died.
"""

import hashlib
import json
import os
import secrets
import time
from datetime import timedelta
from enum import Enum
from typing import NamedTuple

from sqlalchemy import bindparam, func, select, update
from sqlalchemy.exc import IntegrityError

from .errors import (
    IdempotencyConflictError,
    InvalidRequestError,
    InvalidTransitionError,
    JobFinishedError,
    NoSuchJobError,
)
from .models import Job, utcnow
from .schemas import JobOut


class JobState(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


#: Which state may follow which. RUNNING -> RUNNING is a takeover of a job
#: whose worker's lease expired; RUNNING -> QUEUED is a retry.
ALLOWED = {
    JobState.QUEUED: {JobState.RUNNING, JobState.CANCELLED},
    JobState.RUNNING: {JobState.RUNNING, JobState.QUEUED, JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED},
    JobState.SUCCEEDED: set(),
    JobState.FAILED: set(),
    JobState.CANCELLED: set(),
}
FINISHED = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})

MAX_PAGE = 100


def new_id(prefix="job"):
    """An id that sorts by creation time (milliseconds), then at random."""
    return f"{prefix}_{time.time_ns() // 1_000_000:012x}{secrets.token_hex(6)}"


def transition(session, job_id, source, target, *, where=(), returning=False, **values):
    """Move a job from ``source`` to ``target`` if, and only if, it is in ``source``.

    One conditional UPDATE, which also writes the timestamp that goes with
    the new state. ``where`` adds conditions (e.g. the lease owner).

    Returns:
        True if this call made the change; False if the job was not in
        ``source`` (someone else got there first). With ``returning``, the
        updated row instead of True, or None instead of False.

    Raises:
        InvalidTransitionError: the table does not allow ``source -> target``.
    """
    statement = transition_statement(source, target, [Job.id == job_id, *where], values)
    if returning:
        return session.execute(statement.returning(*Job.__table__.columns)).first()
    return session.execute(statement).rowcount == 1


def transition_statement(source, target, where, values):
    """The conditional UPDATE that moves every job matching ``where`` from
    ``source`` to ``target`` (for a set of rows, e.g. a batch's chunk)."""
    source, target = JobState(source), JobState(target)
    if target not in ALLOWED[source]:
        raise InvalidTransitionError(f"a job cannot go from {source.value!r} to {target.value!r}")
    now = utcnow()
    if target == JobState.RUNNING:
        values.setdefault("started_at", func.coalesce(Job.started_at, now))
    elif target in FINISHED:
        values.setdefault("finished_at", now)
        values.setdefault("lease_expires_at", None)
    elif target == JobState.QUEUED:
        values.setdefault("lease_owner", None)
        values.setdefault("lease_expires_at", None)
    return (
        update(Job)
        .where(Job.status == source.value, *where)
        .values(status=target.value, **values)
        .execution_options(synchronize_session=False)
    )


def lease_values(worker, lease_seconds):
    """The columns a claim or a renewal writes: who holds the job, until when."""
    return {"lease_owner": worker, "lease_expires_at": utcnow() + timedelta(seconds=lease_seconds)}


# --- submission and reading (web side) --------------------------------------


def request_hash(request):
    """A fingerprint of a request body, to spot a reused ``Idempotency-Key``."""
    canonical = json.dumps(request.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def check_model_request(settings, request):
    """Checks that need the settings: the model exists, ``max_tokens`` fits.

    Raises:
        InvalidRequestError: naming the field that is wrong.
    """
    if request.model not in settings.models:
        known = ", ".join(sorted(settings.models))
        raise InvalidRequestError(f"model: no model profile {request.model!r}; configured: {known}", "unknown_model")
    limit = settings.models[request.model].max_model_len
    if request.params.max_tokens > limit:
        raise InvalidRequestError(
            f"params.max_tokens: {request.params.max_tokens} is above model {request.model!r}'s limit of {limit}"
        )


def create_job(session, owner_id, request, settings, idempotency_key=None, kind="single"):
    """Store a new queued job for ``request`` (a validated ``JobCreate``).

    With an ``idempotency_key`` that this owner used before, returns the job
    created then instead of a new one.

    Returns:
        ``(job, created)``: the job, and whether this call created it.

    Raises:
        InvalidRequestError: the model is unknown or a parameter exceeds it.
        IdempotencyConflictError: the key was used for a different request.
    """
    check_model_request(settings, request)
    fingerprint = request_hash(request)
    if idempotency_key is not None:
        existing = _find_by_idempotency_key(session, owner_id, idempotency_key)
        if existing is not None:
            return _replay(existing, fingerprint), False
    job = Job(
        id=new_id(),
        owner_id=owner_id,
        kind=kind,
        model=request.model,
        lane=request.priority,
        status=JobState.QUEUED.value,
        prompt=request.prompt,
        messages=[m.model_dump() for m in request.messages] if request.messages else None,
        params=request.params.model_dump(),
        meta=request.metadata,
        webhook_url=request.webhook_url,
        idempotency_key=idempotency_key,
        request_hash=fingerprint,
        attempts=0,
        created_at=utcnow(),
    )
    if idempotency_key is None:
        session.add(job)
        return job, True
    try:
        with session.begin_nested():
            session.add(job)
    except IntegrityError:
        # Another request with the same key won the race.
        existing = _find_by_idempotency_key(session, owner_id, idempotency_key)
        if existing is None:
            raise
        return _replay(existing, fingerprint), False
    return job, True


def _find_by_idempotency_key(session, owner_id, key):
    return session.scalar(select(Job).where(Job.owner_id == owner_id, Job.idempotency_key == key))


def _replay(job, fingerprint):
    if job.request_hash != fingerprint:
        raise IdempotencyConflictError(
            "this Idempotency-Key was already used with a different request body; use a new key"
        )
    return job


def delete_unsent_job(session, job_id):
    """Remove a job whose message the broker refused, so nothing half-exists."""
    job = session.get(Job, job_id)
    if job is not None and job.status == JobState.QUEUED.value and job.attempts == 0:
        session.delete(job)


def get_job(session, owner_id, job_id):
    """The job ``job_id`` if ``owner_id`` created it.

    Raises:
        NoSuchJobError: no such job, or another key's (never tell which).
    """
    job = session.get(Job, job_id) if isinstance(job_id, str) else None
    if job is None or job.owner_id != owner_id:
        raise NoSuchJobError(f"no job {job_id!r}")
    return job


def list_jobs(session, owner_id, status=None, limit=20, cursor=None):
    """A page of the owner's single jobs and tribunals, newest first.

    Batch rows are left out (a batch can hold a million); read them through
    their batch.

    Returns:
        ``(jobs, next_cursor)``; ``next_cursor`` is None on the last page.
    """
    query = select(Job).where(Job.owner_id == owner_id, Job.batch_id.is_(None))
    if status is not None:
        try:
            query = query.where(Job.status == JobState(status).value)
        except ValueError:
            states = ", ".join(s.value for s in JobState)
            raise InvalidRequestError(f"status: {status!r} is not one of {states}") from None
    return newest_first(session, query, Job.id, limit, cursor, "job_")


def newest_first(session, query, id_column, limit, cursor, prefix):
    """One page of ``query`` by descending id (ids sort by creation time).

    Returns:
        ``(items, next_cursor)``; ``next_cursor`` is None on the last page.
    """
    if not 1 <= limit <= MAX_PAGE:
        raise InvalidRequestError(f"limit: must be between 1 and {MAX_PAGE}, got {limit}")
    if cursor is not None:
        if not cursor.startswith(prefix):
            raise InvalidRequestError(f"cursor: {cursor!r} is not a cursor this API returned")
        query = query.where(id_column < cursor)
    items = list(session.scalars(query.order_by(id_column.desc()).limit(limit + 1)))
    next_cursor = items[limit - 1].id if len(items) > limit else None
    return items[:limit], next_cursor


def cancel_job(session, owner_id, job_id):
    """Cancel a queued or running job; its worker discards any result.

    Raises:
        NoSuchJobError: as :func:`get_job`.
        JobFinishedError: the job already ended.
    """
    job = get_job(session, owner_id, job_id)
    for source in (JobState.QUEUED, JobState.RUNNING):
        if transition(session, job_id, source, JobState.CANCELLED, lease_owner=None):
            session.refresh(job)
            return job
    session.refresh(job)
    raise JobFinishedError(f"job {job_id!r} already ended as {job.status!r}; nothing to cancel")


def job_to_dict(job):
    """The public job object (API.md), validated against :class:`JobOut`."""
    finished_ok = job.status == JobState.SUCCEEDED.value
    body = {
        "id": job.id,
        "kind": job.kind,
        "model": job.model,
        "status": job.status,
        "priority": job.lane,
        "result": {"text": job.result_text, "finish_reason": job.finish_reason} if finished_ok else None,
        "usage": (
            {"prompt_tokens": job.prompt_tokens, "completion_tokens": job.completion_tokens}
            if job.prompt_tokens is not None
            else None
        ),
        "error": {"code": job.error_code, "message": job.error_message} if job.error_code else None,
        "attempts": job.attempts,
        "created_at": job.created_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
        "metadata": job.meta,
        "batch_id": job.batch_id,
        "custom_id": job.custom_id,
    }
    return JobOut.model_validate(body).model_dump(mode="json")


# --- running (worker side) ---------------------------------------------------


def worker_identity():
    """A name for this worker process that is unique across the cluster."""
    return f"{os.uname().nodename}:{os.getpid()}:{secrets.token_hex(3)}"


class Claim(NamedTuple):
    """What :func:`claim_job` decided: run ``job`` (a row of the jobs table),
    wait ``retry_in`` seconds, or neither."""

    job: object = None
    retry_in: float = 0.0


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
        transition(
            session, job_id, JobState.RUNNING, JobState.FAILED, where=[abandoned],
            error_code="worker_lost",
            error_message=f"the worker running this job was lost {job.attempts} times; giving up",
        )
        return Claim()
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
    return transition(
        session, job_id, JobState.RUNNING, JobState.SUCCEEDED, where=[Job.lease_owner == worker],
        result_text=text, finish_reason=finish_reason,
        prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
        error_code=None, error_message=None,
    )


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
