"""Leader leases: one process at a time acts for a role (the autoscaler of a
deployment), the others stand by and take over when its lease runs out.

A lease is a row in ``leader_leases`` (:class:`~queue_engine.models.LeaderLease`):
who holds it and until when. The holder renews it well before it expires;
a holder that dies stops renewing, and the first standby to try after
``expires_at`` takes it. Taking and renewing are one conditional UPDATE
(holder is me, or the lease has run out), so two contenders cannot both
win: on PostgreSQL the second UPDATE waits on the first's row lock and then
re-checks its condition against the committed row; SQLite has one writer at
a time. A lease that does not exist yet is inserted, and the loser of that
race gets a unique violation, i.e. False.

Time is the database's clock on PostgreSQL, so hosts whose clocks disagree
still agree on when a lease runs out; SQLite is a file on one host, whose
clock every process shares.
"""

import os
import secrets
import socket
from datetime import timedelta

from sqlalchemy import case, delete, func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError

from .models import LeaderLease, utcnow


def autoscaler_lease(deployment):
    """The name of the lease that the autoscaler of ``deployment`` holds.

    >>> autoscaler_lease("prod")
    'autoscaler:prod'
    """
    return f"autoscaler:{deployment}"


def new_holder_id():
    """A holder identity unique across hosts and processes: ``host:pid:random``."""
    return f"{socket.gethostname()[:150]}:{os.getpid()}:{secrets.token_hex(4)}"


def database_now(session):
    """The current time by the database's clock (PostgreSQL), or this host's (SQLite)."""
    if session.get_bind().dialect.name == "postgresql":
        return session.scalar(select(func.clock_timestamp()))
    return utcnow()


def acquire(session, name, holder, ttl, now=None):
    """Take the lease ``name`` for ``holder``, or renew it, for ``ttl`` seconds.

    It is taken if nobody holds it, if ``holder`` already does, or if the
    lease has run out. ``acquired_at`` stays as it was while the same holder
    renews.

    Args:
        now: the time to decide by (tests); default :func:`database_now`.

    Returns:
        True if ``holder`` holds the lease until ``now + ttl``, False if
        another holder does (or took it first in a race).
    """
    now = now or database_now(session)
    expires_at = now + timedelta(seconds=ttl)
    taken = session.execute(
        update(LeaderLease)
        .where(LeaderLease.name == name, or_(LeaderLease.holder == holder, LeaderLease.expires_at < now))
        .values(holder=holder, expires_at=expires_at,
                acquired_at=case((LeaderLease.holder == holder, LeaderLease.acquired_at), else_=now))
        .execution_options(synchronize_session=False)
    ).rowcount == 1
    if taken:
        return True
    if session.scalar(select(LeaderLease.name).where(LeaderLease.name == name)) is not None:
        return False  # held by another, and not run out
    try:
        with session.begin_nested():
            session.execute(insert(LeaderLease).values(name=name, holder=holder, acquired_at=now,
                                                       expires_at=expires_at))
    except IntegrityError:
        return False  # another contender inserted it first
    return True


def renew(session, name, holder, ttl, now=None):
    """Extend the lease ``name`` by ``ttl`` seconds from now, only if
    ``holder`` still holds it: unlike :func:`acquire`, never a takeover.

    A lease that ran out but that nobody took is still ``holder``'s, since
    nobody else acted meanwhile. Within a transaction, the renewal also locks
    the lease until the transaction ends, so no standby can take it while the
    holder acts in that transaction.

    Returns:
        True if ``holder`` still holds it, False if it lost it.
    """
    now = now or database_now(session)
    return session.execute(
        update(LeaderLease)
        .where(LeaderLease.name == name, LeaderLease.holder == holder)
        .values(expires_at=now + timedelta(seconds=ttl))
        .execution_options(synchronize_session=False)
    ).rowcount == 1


def release(session, name, holder):
    """Give up the lease ``name`` (a clean exit), so a standby takes it at its
    next try instead of waiting for it to run out. Returns whether
    ``holder`` held it."""
    return session.execute(
        delete(LeaderLease).where(LeaderLease.name == name, LeaderLease.holder == holder)
        .execution_options(synchronize_session=False)
    ).rowcount == 1


def read_holder(session, name, now=None):
    """The :class:`~queue_engine.models.LeaderLease` of ``name`` if someone
    holds it now, else None (never taken, released or run out)."""
    lease = session.scalar(select(LeaderLease).where(LeaderLease.name == name)
                           .execution_options(populate_existing=True))
    if lease is None or lease.expires_at < (now or database_now(session)):
        return None
    return lease
