"""Work whose worker died, on SQLite and PostgreSQL: found by its expired
lease, put back in the queue unsent, or failed once it used every attempt.
(Batch rows: test_batches.py; tribunal steps: test_tribunal.py.)"""

from datetime import timedelta

import pytest
from sqlalchemy import update

from queue_engine import dispatch, jobs, leases, recovery
from queue_engine.db import transaction
from queue_engine.models import Job, WebhookEvent, utcnow
from queue_engine.schemas import JobCreate
from tests.conftest import make_key
from tests.work import claim_job, succeed

LEASE = 30


@pytest.fixture
def owner(sessions):
    return make_key(sessions, "alice")[1]


def new_job(sessions, settings, owner, **fields):
    with transaction(sessions) as session:
        return jobs.create_job(session, owner, JobCreate(model="tiny", prompt="Hello", **fields), settings)[0]


def claim(sessions, job_id, worker):
    with transaction(sessions) as session:
        return claim_job(session, job_id, worker, LEASE)


def expire_lease(sessions, job_id):
    with transaction(sessions) as session:
        session.execute(update(Job).where(Job.id == job_id).values(lease_expires_at=utcnow() - timedelta(seconds=1)))


def recover(sessions, settings):
    with transaction(sessions) as session:
        return recovery.recover_abandoned(session, settings, utcnow())


def reload(sessions, job_id):
    with sessions() as session:
        return session.get(Job, job_id)


def test_a_live_lease_is_left_alone(sessions, settings, owner):
    """A worker that renews keeps its job."""
    job = new_job(sessions, settings, owner)
    claim(sessions, job.id, "w1")
    assert recover(sessions, settings) == (0, 0)
    assert reload(sessions, job.id).lease_owner == "w1"


def test_an_expired_job_goes_back_to_the_queue_unsent(sessions, settings, owner):
    """The dead worker's job is queued again, needs a message, runs on another
    worker with its attempts counted, and the dead worker's late result is refused."""
    job = new_job(sessions, settings, owner)
    claim(sessions, job.id, "dead")
    expire_lease(sessions, job.id)
    assert recover(sessions, settings) == (1, 0)
    stored = reload(sessions, job.id)
    assert (stored.status, stored.lease_owner, stored.dispatched_at, stored.attempts) == ("queued", None, None, 1)
    with transaction(sessions) as session:
        assert dispatch.claim_due_jobs(session, utcnow(), 10) == [(job.id, "tiny")]
    assert claim(sessions, job.id, "w2").attempts == 2
    with transaction(sessions) as session:
        assert leases.renew(session, "dead", [job.id], LEASE) == {job.id}, "the dead worker learns it lost the job"
        assert succeed(session, settings, job.id, "dead", text="late").ended == []
        assert succeed(session, settings, job.id, "w2").ended == [job.id]


def test_a_worker_that_renews_after_its_lease_lapsed_keeps_its_job(sessions, settings, owner):
    """A worker that lost the database for longer than its lease renews as soon as it is
    back; if it does so before the dispatcher looks, nothing is taken from it."""
    job = new_job(sessions, settings, owner)
    claim(sessions, job.id, "w1")
    expire_lease(sessions, job.id)
    with transaction(sessions) as session:
        assert leases.renew(session, "w1", [job.id], LEASE) == set(), "still held"
    assert recover(sessions, settings) == (0, 0)
    with transaction(sessions) as session:
        assert succeed(session, settings, job.id, "w1", text="stored after the outage").ended == [job.id]


def test_a_job_lost_max_attempts_times_fails_and_announces_it(sessions, settings, owner):
    """After max_attempts dead workers the job fails as worker_lost instead of
    looping, and its job.failed event is recorded."""
    job = new_job(sessions, settings, owner, webhook_url="https://example.org/hook")
    for number, worker in enumerate(("a", "b", "c"), start=1):
        assert claim(sessions, job.id, worker).attempts == number
        expire_lease(sessions, job.id)
        assert recover(sessions, settings) == ((0, 1) if number == settings.max_attempts else (1, 0))
    stored = reload(sessions, job.id)
    assert (stored.status, stored.error_code, stored.attempts) == ("failed", "worker_lost", 3)
    assert "lost 3 times" in stored.error_message
    with sessions() as session:
        assert session.query(WebhookEvent.type).filter_by(job_id=job.id).scalar() == "job.failed"
