"""The job life cycle, on SQLite and PostgreSQL: conditional transitions,
leases, duplicate messages and the races between cancel and start. (What
happens to the job of a worker that died is in test_recovery.py.)"""

from datetime import timedelta

import pytest
from queue_engine import jobs, leases
from queue_engine.db import transaction
from queue_engine.errors import (
    IdempotencyConflictError,
    InvalidRequestError,
    InvalidTransitionError,
    JobFinishedError,
    NoSuchJobError,
)
from queue_engine.models import Job, utcnow
from queue_engine.schemas import JobCreate
from tests.conftest import make_key
from tests.work import break_down, claim_job, succeed

LEASE = 30


@pytest.fixture
def owner(sessions):
    return make_key(sessions, "alice")[1]


def new_job(sessions, settings, owner, idempotency_key=None, **fields):
    request = JobCreate(model="tiny", prompt=fields.pop("prompt", "Hello"), **fields)
    with transaction(sessions) as session:
        job, created = jobs.create_job(session, owner, request, settings, idempotency_key)
    return job, created


def claim(sessions, job_id, worker="w1"):
    """The claimed job's item, or None if it was not queued."""
    with transaction(sessions) as session:
        return claim_job(session, job_id, worker, LEASE)


def reload(sessions, job_id):
    with sessions() as session:
        return session.get(Job, job_id)


def complete(sessions, settings, job_id, worker="w1"):
    """Whether ``worker``'s result was stored (it still held the job)."""
    with transaction(sessions) as session:
        finished = succeed(session, settings, job_id, worker, "text", "length", 3, 4)
    return job_id in finished.ended


def test_create_job_stores_a_queued_job(sessions, settings, owner):
    """A new job is queued, owned, with its parameters and no attempts yet,
    and marked sent (its creator sends it after the commit)."""
    job, created = new_job(sessions, settings, owner, params={"max_tokens": 7}, metadata={"row": "1"})
    stored = reload(sessions, job.id)
    assert created and stored.status == "queued" and stored.owner_id == owner
    assert stored.dispatched_at is not None and stored.retry_at is None
    assert stored.params["max_tokens"] == 7 and stored.meta == {"row": "1"} and stored.attempts == 0
    assert stored.created_at.tzinfo is not None


def test_create_job_refuses_unknown_model_and_oversized_max_tokens(sessions, settings, owner):
    """Checks that need the model profile name the field."""
    with pytest.raises(InvalidRequestError, match="model: no model profile 'nope'"):
        with transaction(sessions) as session:
            jobs.create_job(session, owner, JobCreate(model="nope", prompt="x"), settings)
    with pytest.raises(InvalidRequestError, match="params.max_tokens: 9999 is above model 'tiny'"):
        new_job(sessions, settings, owner, params={"max_tokens": 9999})


def test_idempotency_key_returns_the_first_job(sessions, settings, owner):
    """The same key and body give back the same job, not a second one."""
    first, created_first = new_job(sessions, settings, owner, idempotency_key="k1")
    second, created_second = new_job(sessions, settings, owner, idempotency_key="k1")
    assert (created_first, created_second) == (True, False)
    assert second.id == first.id


def test_idempotency_key_with_another_body_is_a_conflict(sessions, settings, owner):
    """Reusing a key for a different request is refused."""
    new_job(sessions, settings, owner, idempotency_key="k1")
    with pytest.raises(IdempotencyConflictError, match="different request body"):
        new_job(sessions, settings, owner, idempotency_key="k1", prompt="Something else")


def test_idempotency_keys_are_per_owner(sessions, settings, owner):
    """Two keys' clients may use the same Idempotency-Key independently."""
    other = make_key(sessions, "bob")[1]
    mine, _ = new_job(sessions, settings, owner, idempotency_key="k1")
    theirs, created = new_job(sessions, settings, other, idempotency_key="k1")
    assert created and theirs.id != mine.id


def test_claim_runs_a_queued_job_once(sessions, settings, owner):
    """The first claim starts the job; a duplicate message finds it running and takes nothing."""
    job, _ = new_job(sessions, settings, owner)
    first = claim(sessions, job.id, "w1")
    assert first.id == job.id and first.attempts == 1 and first.prompt == "Hello"
    stored = reload(sessions, job.id)
    assert stored.status == "running" and stored.lease_owner == "w1" and stored.started_at is not None
    assert claim(sessions, job.id, "w2") is None
    assert reload(sessions, job.id).lease_owner == "w1"


def test_redelivered_message_for_a_finished_job_does_nothing(sessions, settings, owner):
    """Once succeeded, a job is never claimed again."""
    job, _ = new_job(sessions, settings, owner)
    claim(sessions, job.id)
    assert complete(sessions, settings, job.id)
    assert claim(sessions, job.id, "w2") is None
    stored = reload(sessions, job.id)
    assert stored.status == "succeeded" and stored.attempts == 1 and stored.result_text == "text"


def test_cancel_before_start_means_never_started(sessions, settings, owner):
    """A cancelled job is never started by a message that arrives later."""
    job, _ = new_job(sessions, settings, owner)
    with transaction(sessions) as session:
        assert jobs.cancel_job(session, owner, job.id).status == "cancelled"
    assert claim(sessions, job.id) is None
    stored = reload(sessions, job.id)
    assert stored.status == "cancelled" and stored.started_at is None and stored.finished_at is not None


def test_cancel_while_running_discards_the_result(sessions, settings, owner):
    """Cancel wins over a running job: the lease cannot be renewed, the result is not stored."""
    job, _ = new_job(sessions, settings, owner)
    claim(sessions, job.id)
    with transaction(sessions) as session:
        jobs.cancel_job(session, owner, job.id)
    with transaction(sessions) as session:
        assert leases.renew(session, "w1", [job.id], LEASE) == {job.id}, "no longer held"
    assert not complete(sessions, settings, job.id)
    assert reload(sessions, job.id).status == "cancelled"


def test_cancel_finished_job_is_refused(sessions, settings, owner):
    """A finished job cannot be cancelled."""
    job, _ = new_job(sessions, settings, owner)
    claim(sessions, job.id)
    complete(sessions, settings, job.id)
    with pytest.raises(JobFinishedError, match="already ended as 'succeeded'"):
        with transaction(sessions) as session:
            jobs.cancel_job(session, owner, job.id)


def test_requeue_after_failed_attempt_keeps_the_error(sessions, settings, owner):
    """A failed attempt puts the job back in the queue, unsent until its delay
    has passed; then a retry can finish it."""
    job, _ = new_job(sessions, settings, owner)
    claim(sessions, job.id)
    before = utcnow()
    with transaction(sessions) as session:
        retried = break_down(session, settings.model_copy(update={"retry_delay": 5}), job.id, "boom")
    assert retried.requeued == [job.id] and retried.ended == []
    stored = reload(sessions, job.id)
    assert (stored.status, stored.error_code, stored.lease_owner) == ("queued", "engine_error", None)
    assert stored.dispatched_at is None and stored.retry_at >= before + timedelta(seconds=5)
    assert claim(sessions, job.id, "w2").attempts == 2
    assert complete(sessions, settings, job.id, "w2")
    assert reload(sessions, job.id).error_code is None


def test_transition_table_is_enforced(sessions, settings, owner):
    """A transition the table does not allow raises instead of writing."""
    job, _ = new_job(sessions, settings, owner)
    with pytest.raises(InvalidTransitionError, match="from 'succeeded' to 'running'"):
        with transaction(sessions) as session:
            jobs.transition(session, job.id, "succeeded", "running")
    with transaction(sessions) as session:
        assert not jobs.transition(session, job.id, "running", "succeeded"), "job is queued, not running"


def test_other_owner_sees_no_such_job(sessions, settings, owner):
    """Another key's job is indistinguishable from a missing one."""
    other = make_key(sessions, "bob")[1]
    job, _ = new_job(sessions, settings, owner)
    with sessions() as session:
        with pytest.raises(NoSuchJobError):
            jobs.get_job(session, other, job.id)
        with pytest.raises(NoSuchJobError):
            jobs.cancel_job(session, other, job.id)


def test_list_jobs_pages_newest_first(sessions, settings, owner):
    """Cursor paging walks every job once, newest first, filtered by status."""
    created = [new_job(sessions, settings, owner)[0].id for _ in range(5)]
    claim(sessions, created[0])
    seen, cursor = [], None
    with sessions() as session:
        while True:
            page, cursor = jobs.list_jobs(session, owner, limit=2, cursor=cursor)
            seen += [job.id for job in page]
            if cursor is None:
                break
        running, _ = jobs.list_jobs(session, owner, status="running")
        with pytest.raises(InvalidRequestError, match="status: 'done' is not one of"):
            jobs.list_jobs(session, owner, status="done")
        with pytest.raises(InvalidRequestError, match="limit: must be between 1 and 100"):
            jobs.list_jobs(session, owner, limit=101)
    assert seen == sorted(created, reverse=True)
    assert [job.id for job in running] == [created[0]]
