"""A key's quotas, checked when work is submitted: how much it may have
waiting at once, and how many tokens it may use per day or month.

What is *waiting* for a key: its single jobs and tribunal steps that are
queued or running (a tribunal itself is counted through its steps), and the
rows of its batches in progress or cancelling that have not ended. Tokens
are estimates (``jobs.estimate_tokens``: prompt characters / 4 + max_tokens);
a batch counts its ``planned_tokens`` (made at upload) scaled by the share of
its rows not yet ended.

A job or tribunal is checked before it is stored, from its request. A
batch can only be counted once its upload was read, so it is checked in
the transaction that read it, before the commit, and refused by raising:
the transaction (for a ``/v1`` batch, its savepoint) rolls back and nothing
of it is kept. Two submissions racing may both pass and overshoot a limit
by one submission; a quota is a fair-use bound, not an invariant.

The token budget is read from ``usage_daily`` (what finished requests
used, written as they finish), since the start of the UTC day or month.
Reaching it refuses new work; running work finishes and may go past it.

Keys without a limit cost nothing: every check returns before any query.
"""

import math
from datetime import datetime, timedelta, timezone
from typing import NamedTuple

from sqlalchemy import Text, case, cast, func, select

from .apikeys import get_api_key
from .batches import ACTIVE
from .errors import QuotaExceededError, TokenBudgetExhaustedError
from .jobs import CHARS_PER_TOKEN, DEFAULT_MAX_TOKENS, JobState, estimate_tokens
from .models import Batch, Job, UsageDaily, utcnow

WAITING_STATES = (JobState.QUEUED.value, JobState.RUNNING.value)


class Waiting(NamedTuple):
    """Requests (rows) and estimated tokens waiting or running."""

    rows: int
    tokens: int


def waiting_of(session, owner_id):
    """What the key ``owner_id`` has waiting or running now (two aggregate queries).

    A job's tokens are summed by the database with the same estimate as
    ``jobs.estimate_tokens``; the ``(chars + 3) // 4`` is integer division,
    the ceiling of chars / 4.
    """
    chars = func.coalesce(func.length(Job.prompt), func.length(cast(Job.messages, Text)), 0)
    max_tokens = func.coalesce(Job.params["max_tokens"].as_integer(), DEFAULT_MAX_TOKENS)
    job_rows, job_tokens_sum = session.execute(
        select(func.count(), func.coalesce(func.sum((chars + CHARS_PER_TOKEN - 1) // CHARS_PER_TOKEN + max_tokens), 0))
        .where(Job.owner_id == owner_id, Job.batch_id.is_(None), Job.kind != "tribunal",
               Job.status.in_(WAITING_STATES))).one()
    unfinished = Batch.total - Batch.completed - Batch.failed - Batch.cancelled
    batch_rows, batch_tokens = session.execute(
        select(func.coalesce(func.sum(unfinished), 0),
               func.coalesce(func.sum(case((Batch.total > 0, Batch.planned_tokens * unfinished // Batch.total),
                                           else_=0)), 0))
        .where(Batch.owner_id == owner_id, Batch.status.in_(ACTIVE))).one()
    return Waiting(int(job_rows) + int(batch_rows), int(job_tokens_sum) + int(batch_tokens))


def request_waiting(request, copies=1):
    """What a job request (``JobCreate``, ``TribunalCreate``) adds, as
    ``copies`` jobs (a tribunal's first steps), estimated as they will be stored."""
    messages = [message.model_dump() for message in request.messages] if request.messages else None
    return Waiting(copies, copies * estimate_tokens(request.prompt, messages, request.params.max_tokens))


def batch_waiting(batch):
    """What a new ``batch`` adds: its rows not ended (rows that could not
    run failed at upload), and its planned tokens scaled as :func:`waiting_of` does."""
    unfinished = batch.total - batch.completed - batch.failed - batch.cancelled
    return Waiting(unfinished, batch.planned_tokens * unfinished // batch.total if batch.total else 0)


def check_waiting(session, identity, added, stored=False):
    """Refuse a submission that would take the key over ``max_waiting_rows``
    or ``max_waiting_tokens``.

    Args:
        identity: the submitting key's :class:`~queue_engine.apikeys.KeyIdentity`.
        added: what the submission adds (:class:`Waiting`); a submission
            that adds nothing is never refused.
        stored: the submission is in the session already (a batch), so
            what the database counts includes it.

    Raises:
        QuotaExceededError: naming the limit, its value and what waits now.
    """
    if identity.max_waiting_rows is None and identity.max_waiting_tokens is None:
        return
    if not added.rows:
        return
    if stored:
        session.flush()
    waiting = waiting_of(session, identity.id)
    if stored:
        waiting = Waiting(waiting.rows - added.rows, waiting.tokens - added.tokens)
    for name, limit, now, adds, unit in (
        ("max_waiting_rows", identity.max_waiting_rows, waiting.rows, added.rows, "requests"),
        ("max_waiting_tokens", identity.max_waiting_tokens, waiting.tokens, added.tokens,
         "tokens (estimated: prompt characters / 4 + max_tokens)"),
    ):
        if limit is not None and now + adds > limit:
            raise QuotaExceededError(
                f"{name}: this key may have {limit} {unit} waiting or running at once; {now} are now, "
                f"and this submission adds {adds}. Nothing was stored: submit again once some of its work has "
                "ended, or ask an operator to raise the limit")


def period_bounds(period, now):
    """The start and end (UTC datetimes) of the ``day`` or ``month`` that holds ``now``.

    >>> start, end = period_bounds("month", datetime(2026, 12, 31, 23, 0, tzinfo=timezone.utc))
    >>> start.isoformat(), end.isoformat()
    ('2026-12-01T00:00:00+00:00', '2027-01-01T00:00:00+00:00')
    """
    day = datetime(now.year, now.month, now.day, tzinfo=timezone.utc)
    if period == "day":
        return day, day + timedelta(days=1)
    start = day.replace(day=1)
    return start, (start + timedelta(days=32)).replace(day=1)


def used_tokens(session, owner_id, since):
    """Prompt and completion tokens the key's finished requests used on the days from ``since`` on."""
    return int(session.scalar(
        select(func.coalesce(func.sum(UsageDaily.prompt_tokens + UsageDaily.completion_tokens), 0))
        .where(UsageDaily.owner_id == owner_id, UsageDaily.day >= since.date())))


def check_budget(session, identity, now=None):
    """Refuse new work once the key has used its ``token_budget`` this period.

    Raises:
        TokenBudgetExhaustedError: saying when the period resets (``retry_after`` too).
    """
    if identity.token_budget is None:
        return
    now = now or utcnow()
    period = identity.budget_period or "day"
    start, end = period_bounds(period, now)
    used = used_tokens(session, identity.id, start)
    if used >= identity.token_budget:
        raise TokenBudgetExhaustedError(
            f"token_budget: this key's budget of {identity.token_budget} tokens per {period} (UTC) is used up "
            f"({used} used since {start:%Y-%m-%d}); new work is accepted again when it resets at "
            f"{end.isoformat()}", retry_after=max(1, math.ceil((end - now).total_seconds())))


def describe_key(session, name, now=None):
    """Everything about the key ``name`` an operator asks for: its rights,
    share and quotas, what it has waiting now and its tokens this period.

    Raises:
        NoSuchKeyError: no key has this name.
    """
    row = get_api_key(session, name)
    now = now or utcnow()
    period = row.budget_period or "day"
    start, end = period_bounds(period, now)
    waiting = waiting_of(session, row.id)
    return {
        "name": row.name, "is_operator": row.is_operator, "share": row.share,
        "created_at": row.created_at.isoformat(), "revoked_at": row.revoked_at and row.revoked_at.isoformat(),
        "max_waiting_rows": row.max_waiting_rows, "max_waiting_tokens": row.max_waiting_tokens,
        "requests_per_minute": row.requests_per_minute, "token_budget": row.token_budget,
        "budget_period": row.budget_period,
        "waiting_rows": waiting.rows, "waiting_tokens": waiting.tokens,
        "period": period, "period_started_at": start.isoformat(), "period_resets_at": end.isoformat(),
        "used_tokens": used_tokens(session, row.id, start),
    }
