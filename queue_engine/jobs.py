"""The job life cycle: states and transitions, submitting, reading, cancelling.

Every state change is one conditional UPDATE made by :func:`transition`
(``... WHERE status = <expected>``), so a redelivered message never runs a
finished job again and a cancelled job never starts. What a worker does with
a job it took (claim, lease, finish) is in ``leases.py``; how a waiting job
gets its message on the broker, and gets it again, is in ``dispatch.py``.
"""

import hashlib
import json
import math
from enum import Enum

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError

from .errors import (
    IdempotencyConflictError,
    InvalidRequestError,
    JobFinishedError,
    NoSuchJobError,
)
from . import webhooks
from .models import Job, new_id, utcnow
from .params import Params
from .schemas import JobOut
from .states import check_move


class JobState(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


#: Which state may follow which. RUNNING -> QUEUED is a retry, or the
#: recovery of a job whose worker stopped renewing its lease.
ALLOWED = {
    JobState.QUEUED: {JobState.RUNNING, JobState.CANCELLED},
    JobState.RUNNING: {JobState.QUEUED, JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED},
    JobState.SUCCEEDED: set(),
    JobState.FAILED: set(),
    JobState.CANCELLED: set(),
}
FINISHED = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})

MAX_PAGE = 100
#: What a request generates at most when it does not say (``params.max_tokens``).
DEFAULT_MAX_TOKENS = Params.model_fields["max_tokens"].default
#: Characters per token, for estimating a prompt's tokens without its tokenizer.
CHARS_PER_TOKEN = 4


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
    source, target = check_move(ALLOWED, source, target, "job")
    now = utcnow()
    if target == JobState.RUNNING:
        values.setdefault("started_at", func.coalesce(Job.started_at, now))
    elif target in FINISHED:
        values.setdefault("finished_at", now)
        values.setdefault("lease_expires_at", None)
    elif target == JobState.QUEUED:
        values.setdefault("lease_owner", None)
        values.setdefault("lease_expires_at", None)
        values.setdefault("dispatched_at", None)  # back in the queue: it needs a message again
    return (
        update(Job)
        .where(Job.status == source.value, *where)
        .values(status=target.value, **values)
        .execution_options(synchronize_session=False)
    )


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
    check_model(settings, request.model, request.params, "model")


def check_model(settings, model, params, field):
    """Check that ``model`` (given in ``field``) is a profile that can take ``params``.

    Raises:
        InvalidRequestError: naming ``field`` or ``params.max_tokens``.
    """
    if model not in settings.models:
        known = ", ".join(sorted(settings.models))
        raise InvalidRequestError(f"{field}: no model profile {model!r}; configured: {known}", "unknown_model")
    limit = settings.models[model].max_model_len
    if params.max_tokens > limit:
        raise InvalidRequestError(f"params.max_tokens: {params.max_tokens} is above model {model!r}'s limit of {limit}")


def create_job(session, owner_id, request, settings, idempotency_key=None, kind="single", stream=False):
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
    # Marked sent now; the caller sends after commit, or marks it unsent again (dispatch.release_jobs).
    job = job_from_request(owner_id, request, idempotency_key, kind=kind, model=request.model, lane=request.priority,
                           dispatched_at=utcnow(), stream=stream)
    return add_once(session, job)


def job_from_request(owner_id, request, idempotency_key=None, **fields):
    """A new queued job with what every request has (the prompt or messages,
    params, metadata, webhook) and ``fields`` (kind, model, lane...)."""
    return Job(
        id=new_id(),
        owner_id=owner_id,
        status=JobState.QUEUED.value,
        prompt=request.prompt,
        messages=[m.model_dump() for m in request.messages] if request.messages else None,
        params=request.params.model_dump(),
        meta=request.metadata,
        webhook_url=request.webhook_url,
        idempotency_key=idempotency_key,
        request_hash=request_hash(request),
        attempts=0,
        created_at=utcnow(),
        **fields,
    )


def add_once(session, job):
    """Add a new ``job``, unless its owner already used its idempotency key.

    Returns:
        ``(job, created)``: ``job`` and True, or the job stored earlier under
        the same key and False.

    Raises:
        IdempotencyConflictError: the key was used for a different request.
    """
    if job.idempotency_key is None:
        session.add(job)
        return job, True
    existing = _find_by_idempotency_key(session, job.owner_id, job.idempotency_key)
    if existing is not None:
        return _replay(existing, job.request_hash), False
    try:
        with session.begin_nested():
            session.add(job)
    except IntegrityError:
        # Another request with the same key won the race.
        existing = _find_by_idempotency_key(session, job.owner_id, job.idempotency_key)
        if existing is None:
            raise
        return _replay(existing, job.request_hash), False
    return job, True


def _find_by_idempotency_key(session, owner_id, key):
    return session.scalar(select(Job).where(Job.owner_id == owner_id, Job.idempotency_key == key))


def _replay(job, fingerprint):
    if job.request_hash != fingerprint:
        raise IdempotencyConflictError(
            "this Idempotency-Key was already used with a different request body; use a new key"
        )
    return job


def estimate_tokens(prompt, messages, max_tokens=None):
    """The tokens a request may cost: its prompt's characters / 4, rounded
    up, plus what it may generate. Chat messages count as the characters of
    their JSON text, as stored (a little more than their contents), so the
    database can sum the same estimate over waiting jobs (``quotas``).

    >>> estimate_tokens("The list type", None, 16)
    20
    >>> estimate_tokens(None, [{"role": "user", "content": "Hi"}])
    265
    """
    chars = len(prompt) if prompt is not None else len(json.dumps(messages)) if messages else 0
    return math.ceil(chars / CHARS_PER_TOKEN) + (max_tokens or DEFAULT_MAX_TOKENS)


def job_tokens(job):
    """:func:`estimate_tokens` of a stored or new job."""
    return estimate_tokens(job.prompt, job.messages, (job.params or {}).get("max_tokens"))


def get_job(session, owner_id, job_id, operator=False):
    """The job ``job_id`` if ``owner_id`` created it, or any key's for an ``operator``.

    A tribunal's steps are not jobs of the API: they are read through the
    tribunal's trace.

    Raises:
        NoSuchJobError: no such job, or another key's (never tell which).
    """
    job = session.get(Job, job_id) if isinstance(job_id, str) else None
    if job is None or (job.owner_id != owner_id and not operator) or job.parent_id is not None:
        raise NoSuchJobError(f"no job {job_id!r}")
    return job


def list_jobs(session, owner_id, status=None, limit=20, cursor=None):
    """A page of the owner's single jobs and tribunals, newest first.

    Batch rows are left out (a batch can hold a million); read them through
    their batch. A tribunal's steps are left out too.

    Returns:
        ``(jobs, next_cursor)``; ``next_cursor`` is None on the last page.
    """
    query = select(Job).where(Job.owner_id == owner_id, Job.batch_id.is_(None), Job.parent_id.is_(None))
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


def cancel_job(session, owner_id, job_id, operator=False):
    """Cancel a queued or running job; its worker discards any result.

    A tribunal's unfinished steps are cancelled with it, so their workers
    stop, and nothing schedules the steps that would have followed.

    Raises:
        NoSuchJobError: as :func:`get_job` (an ``operator`` may cancel any key's).
        JobFinishedError: the job already ended.
    """
    job = get_job(session, owner_id, job_id, operator)
    for source in (JobState.QUEUED, JobState.RUNNING):
        if transition(session, job_id, source, JobState.CANCELLED, lease_owner=None):
            cancel_steps(session, job_id)
            session.refresh(job)
            return job
    session.refresh(job)
    raise JobFinishedError(f"job {job_id!r} already ended as {job.status!r}; nothing to cancel")


def cancel_steps(session, parent_id):
    """Cancel every unfinished step of the tribunal ``parent_id``."""
    for source in (JobState.QUEUED, JobState.RUNNING):
        session.execute(transition_statement(source, JobState.CANCELLED, [Job.parent_id == parent_id],
                                             {"lease_owner": None}))


def announce_end(session, job_id):
    """Record the ``job.completed`` or ``job.failed`` event of a single job or
    tribunal that just ended, if it has a ``webhook_url``.

    Call it in the transaction that ended the job. Batch rows and tribunal
    steps announce nothing (their batch or tribunal does).
    """
    job = session.get(Job, job_id, populate_existing=True)
    if job is None or not job.webhook_url or job.batch_id is not None or job.parent_id is not None:
        return None
    event_type = webhooks.JOB_EVENTS.get(job.status)
    if event_type is None:
        return None
    return webhooks.record_event(session, job.owner_id, job.webhook_url, event_type, job_to_dict(job), job_id=job.id)


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
        "tribunal": job.tribunal,
    }
    return JobOut.model_validate(body).model_dump(mode="json")
