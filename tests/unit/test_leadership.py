"""Leader leases on SQLite and PostgreSQL: taking, renewing, running out,
releasing, and two contenders racing for one lease."""

import threading
from datetime import timedelta
from functools import partial

import pytest
from sqlalchemy import select

from queue_engine import leadership
from queue_engine.db import transaction
from queue_engine.models import LeaderLease, utcnow
from tests.helpers import race

NAME = leadership.autoscaler_lease("dep")


def acquire(sessions, holder, ttl=15, now=None):
    with transaction(sessions) as session:
        return leadership.acquire(session, NAME, holder, ttl, now=now)


def lease_row(sessions):
    with sessions() as session:
        return session.scalar(select(LeaderLease).where(LeaderLease.name == NAME))


def test_lease_names_are_pinned():
    """The lease name is part of the stored data: changing it would let a new version lead beside an old one."""
    assert leadership.autoscaler_lease("prod") == "autoscaler:prod"


def test_holder_ids_name_the_host_and_process_and_differ_per_instance():
    """Two autoscalers in one process still get different identities."""
    first, second = leadership.new_holder_id(), leadership.new_holder_id()
    assert first != second and first.split(":")[:2] == second.split(":")[:2]
    assert len(first) <= LeaderLease.holder.type.length


def test_leadership_the_first_holder_takes_the_lease_and_the_second_is_refused(sessions):
    """A free lease goes to whoever asks; while it runs, nobody else gets it."""
    assert acquire(sessions, "a")
    assert not acquire(sessions, "b")
    lease = lease_row(sessions)
    assert lease.holder == "a" and lease.expires_at > utcnow() + timedelta(seconds=14)
    with sessions() as session:
        assert leadership.read_holder(session, NAME).holder == "a"


def test_leadership_renewing_extends_the_lease_and_keeps_when_it_was_acquired(sessions):
    """The holder's renewals move expires_at on, not acquired_at."""
    start = utcnow()
    assert acquire(sessions, "a", ttl=10, now=start)
    assert acquire(sessions, "a", ttl=10, now=start + timedelta(seconds=5))
    lease = lease_row(sessions)
    assert (lease.acquired_at, lease.expires_at) == (start, start + timedelta(seconds=15))
    with transaction(sessions) as session:
        assert leadership.renew(session, NAME, "a", 10, now=start + timedelta(seconds=8))
        assert not leadership.renew(session, NAME, "b", 10, now=start + timedelta(seconds=8))
    assert lease_row(sessions).expires_at == start + timedelta(seconds=18)


def test_leadership_a_lease_that_ran_out_is_taken_over(sessions):
    """A holder that stopped renewing loses the lease to the next contender after expires_at."""
    start = utcnow()
    assert acquire(sessions, "a", ttl=10, now=start)
    assert not acquire(sessions, "b", ttl=10, now=start + timedelta(seconds=9))
    with sessions() as session:
        assert leadership.read_holder(session, NAME, now=start + timedelta(seconds=11)) is None
    assert acquire(sessions, "b", ttl=10, now=start + timedelta(seconds=11))
    lease = lease_row(sessions)
    assert (lease.holder, lease.acquired_at) == ("b", start + timedelta(seconds=11))
    with transaction(sessions) as session:  # the old holder comes back: a renewal is never a takeover
        assert not leadership.renew(session, NAME, "a", 10, now=start + timedelta(seconds=12))
    assert not acquire(sessions, "a", ttl=10, now=start + timedelta(seconds=12))


def test_leadership_a_released_lease_is_free_at_once_and_only_its_holder_releases_it(sessions):
    """A clean exit hands over without waiting for the lease to run out."""
    assert acquire(sessions, "a", ttl=600)
    with transaction(sessions) as session:
        assert not leadership.release(session, NAME, "b")
        assert leadership.release(session, NAME, "a")
    with sessions() as session:
        assert leadership.read_holder(session, NAME) is None
    with transaction(sessions) as session:
        assert not leadership.renew(session, NAME, "a", 600)  # released: gone for its old holder too
    assert acquire(sessions, "b", ttl=600)
    assert lease_row(sessions).holder == "b"


def test_leadership_leases_of_other_names_are_independent(sessions):
    """Each deployment's autoscaler has a lease of its own."""
    assert acquire(sessions, "a")
    with transaction(sessions) as session:
        assert leadership.acquire(session, leadership.autoscaler_lease("other"), "b", 15)


def race_for(sessions, contenders, attempt):
    """``attempt(session, holder)`` for each contender, in racing transactions: ``{holder: result}``."""
    return dict(zip(contenders, race(sessions, [partial(attempt, holder=holder) for holder in contenders])))


@pytest.mark.postgres
def test_leadership_two_contenders_racing_for_a_new_lease_on_postgresql_one_wins(sessions, database_url):
    """Both find no row and insert it; the loser gets False, not an error."""
    if not database_url.startswith("postgresql"):
        pytest.skip("SQLite has one writer at a time; the race needs PostgreSQL")
    results = race_for(sessions, ["a", "b"], lambda session, holder: leadership.acquire(session, NAME, holder, 15))
    assert sorted(results.values()) == [False, True]
    assert lease_row(sessions).holder == next(holder for holder, won in results.items() if won)


@pytest.mark.postgres
def test_leadership_two_contenders_racing_for_a_lease_that_ran_out_on_postgresql_one_wins(sessions, database_url):
    """Both see it expired; the second UPDATE waits for the first and re-checks against the new holder."""
    if not database_url.startswith("postgresql"):
        pytest.skip("SQLite has one writer at a time; the race needs PostgreSQL")
    assert acquire(sessions, "old", ttl=1, now=utcnow() - timedelta(seconds=60))
    results = race_for(sessions, ["a", "b"], lambda session, holder: leadership.acquire(session, NAME, holder, 15))
    assert sorted(results.values()) == [False, True]
    assert lease_row(sessions).holder == next(holder for holder, won in results.items() if won)


def test_leadership_a_renewal_in_an_open_transaction_holds_off_a_takeover(sessions):
    """While the holder's round is open (its renewal not committed), a contender cannot take a lease
    that ran out; after the commit it sees the renewed lease."""
    assert acquire(sessions, "a", ttl=1, now=utcnow() - timedelta(seconds=60))  # long run out
    renewed, attempted, results = threading.Event(), threading.Event(), {}

    def contender():
        renewed.wait(10)
        with transaction(sessions) as session:
            attempted.set()
            results["b"] = leadership.acquire(session, NAME, "b", 15)

    thread = threading.Thread(target=contender)
    thread.start()
    with transaction(sessions) as session:
        assert leadership.renew(session, NAME, "a", 15)
        renewed.set()
        attempted.wait(10)
        thread.join(0.5)  # the contender is blocked on the lease until this round commits
        assert thread.is_alive() and "b" not in results
    thread.join(30)
    assert results == {"b": False} and lease_row(sessions).holder == "a"
