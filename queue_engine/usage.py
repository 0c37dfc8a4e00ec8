"""Accounting: what each key used of each model, per day (UTC).

Every request that finishes with a generation adds to one :class:`UsageDaily`
row, ``(owner, model, day)``: one request, its prompt and completion tokens
and its engine seconds (its share of the engine steps it ran in). The
increments are added in the transaction that stores the outcomes
(``leases.finish``), grouped first, so a finish of hundreds of rows of one
key is one upsert. Usage is read from these rows only, never from the jobs:
a few rows per key and model per day, however many requests there were.
"""

import re
from datetime import date
from typing import NamedTuple

from sqlalchemy import func, select
from sqlalchemy.dialects import postgresql, sqlite

from .errors import InvalidRequestError
from .models import ApiKey, UsageDaily
from .schemas import UsageReport

#: What usage may be grouped by, and the column each reads.
GROUPS = {"key": ApiKey.name, "model": UsageDaily.model, "day": UsageDaily.day}
#: The columns an increment adds to.
COUNTERS = ("requests", "prompt_tokens", "completion_tokens", "engine_seconds")
#: Rows per upsert statement, well under SQLite's limit on bound parameters.
UPSERT_ROWS = 1000

_DAY = re.compile(r"\d{4}-\d{2}-\d{2}")


class Increment(NamedTuple):
    """What finished requests add to one key's usage of one model on one day."""

    owner_id: int
    model: str
    day: date
    requests: int = 1
    prompt_tokens: int = 0
    completion_tokens: int = 0
    engine_seconds: float = 0.0


def add_up(increments):
    """One :class:`Increment` per ``(owner_id, model, day)``, in that order.

    >>> day = date(2026, 12, 1)
    >>> add_up([Increment(1, "tiny", day, 1, 5, 2, 0.5), Increment(1, "tiny", day, 1, 3, 1, 0.25)])
    [Increment(owner_id=1, model='tiny', day=datetime.date(2026, 12, 1), requests=2, prompt_tokens=8, completion_tokens=3, engine_seconds=0.75)]
    """
    sums = {}
    for increment in increments:
        group = increment[:3]
        total = sums.get(group)
        sums[group] = increment if total is None else Increment(
            *group, *(a + b for a, b in zip(total[3:], increment[3:])))
    # One order for every transaction, so concurrent upserts lock rows in the same order (no deadlock).
    return [sums[group] for group in sorted(sums)]


def record(session, increments):
    """Add ``increments`` to the usage rows, in ``session``'s transaction.

    Grouped per ``(owner_id, model, day)`` first, then one
    ``INSERT ... ON CONFLICT (owner_id, model, day) DO UPDATE SET requests =
    usage_daily.requests + excluded.requests, ...`` for all of them. The
    statement is atomic on both databases: on PostgreSQL a concurrent insert
    of the same row makes one of them wait and then update; SQLite runs one
    writer at a time. So workers finishing for the same key and day at once
    lose no increment.
    """
    rows = [increment._asdict() for increment in add_up(increments)]
    if not rows:
        return
    insert = postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert
    for start in range(0, len(rows), UPSERT_ROWS):
        statement = insert(UsageDaily).values(rows[start:start + UPSERT_ROWS])
        statement = statement.on_conflict_do_update(
            index_elements=[UsageDaily.owner_id, UsageDaily.model, UsageDaily.day],
            set_={name: getattr(UsageDaily, name) + getattr(statement.excluded, name) for name in COUNTERS},
        )
        session.execute(statement)


# --- reading -------------------------------------------------------------------


def parse_day(text, param):
    """A ``YYYY-MM-DD`` date.

    Raises:
        InvalidRequestError: naming ``param``.

    >>> parse_day("2026-12-01", "from")
    datetime.date(2026, 12, 1)
    """
    try:
        if _DAY.fullmatch(text):
            return date.fromisoformat(text)
    except ValueError:
        pass
    raise InvalidRequestError(f"{param}: {text!r} is not a date as YYYY-MM-DD (e.g. 2026-12-01)", param=param)


def period(date_from, date_to, today):
    """The days to read, from ``YYYY-MM-DD`` text or None: by default, the
    month of ``today`` so far.

    Raises:
        InvalidRequestError: a date that cannot be read, or ``from`` after ``to``.

    >>> period(None, None, date(2026, 12, 9))
    (datetime.date(2026, 12, 1), datetime.date(2026, 12, 9))
    """
    first = today.replace(day=1) if date_from is None else parse_day(date_from, "from")
    last = today if date_to is None else parse_day(date_to, "to")
    if first > last:
        raise InvalidRequestError(f"from: {first.isoformat()} is after to ({last.isoformat()}); "
                                  "give from on or before to", param="from")
    return first, last


def check_group_by(group_by):
    """``group_by`` if usage can be grouped by it.

    Raises:
        InvalidRequestError: naming ``group_by``.
    """
    if group_by not in GROUPS:
        raise InvalidRequestError(f"group_by: {group_by!r} is not one of {', '.join(GROUPS)}", param="group_by")
    return group_by


def read_usage(session, owner_id, date_from, date_to, group_by, key_name=None):
    """Usage from ``date_from`` to ``date_to`` (both included), one row per group.

    Args:
        owner_id: one key's usage; None: every key's.
        group_by: ``key`` (its name), ``model`` or ``day``.
        key_name: only the key of this name (the operator's CLI).

    Returns:
        Dicts with the group's value under ``group_by`` (a day as a
        :class:`date`), ``requests``, ``prompt_tokens``, ``completion_tokens``,
        ``total_tokens`` and ``engine_seconds``, ordered by the group.
    """
    group = GROUPS[check_group_by(group_by)]
    query = (
        select(group, *(func.sum(getattr(UsageDaily, name)) for name in COUNTERS))
        .join(ApiKey, ApiKey.id == UsageDaily.owner_id)
        .where(UsageDaily.day >= date_from, UsageDaily.day <= date_to)
        .group_by(group)
        .order_by(group)
    )
    if owner_id is not None:
        query = query.where(UsageDaily.owner_id == owner_id)
    if key_name is not None:
        query = query.where(ApiKey.name == key_name)
    return [usage_row({group_by: value}, *sums) for value, *sums in session.execute(query)]


def usage_row(group, requests, prompt_tokens, completion_tokens, engine_seconds):
    """One group's sums as plain numbers (PostgreSQL sums integers as decimals)."""
    prompt_tokens, completion_tokens = int(prompt_tokens or 0), int(completion_tokens or 0)
    return {**group, "requests": int(requests or 0), "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens,
            "engine_seconds": float(engine_seconds or 0.0)}


def total_of(rows):
    """The sums of ``rows`` (as :func:`read_usage` returns them)."""
    return usage_row({}, *(sum(row[name] for row in rows) for name in COUNTERS))


def usage_to_dict(rows, date_from, date_to, group_by):
    """The public usage report (``GET /api/v1/usage``)."""
    body = {"from": date_from, "to": date_to, "group_by": group_by, "data": rows, "total": total_of(rows)}
    return UsageReport.model_validate(body).model_dump(mode="json", by_alias=True, exclude_none=True)
