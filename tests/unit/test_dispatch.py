"""The outbox, on SQLite and PostgreSQL: what needs a message, what is due,
what a broker that lost its data held, and which sent messages are missing."""

import io
from datetime import timedelta

import pytest
from sqlalchemy import select, update

from queue_engine import batches, dispatch, fairshare, jobs, webhooks
from queue_engine.db import transaction
from queue_engine.errors import InvalidTransitionError
from queue_engine.models import BatchChunk, Job, WebhookEvent, utcnow
from queue_engine.schemas import BatchCreate, JobCreate
from queue_engine.uploads import Upload, read_rows
from tests.conftest import make_key
from tests.helpers import race
from tests.work import break_down, claim_chunk, claim_job, succeed


@pytest.fixture
def owner(sessions):
    return make_key(sessions, "alice")[1]


def new_jobs(sessions, settings, owner, count, **fields):
    """``count`` jobs, marked sent as a submission leaves them, one millisecond apart."""
    ids = []
    with transaction(sessions) as session:
        for n in range(count):
            job, _ = jobs.create_job(session, owner, JobCreate(model="tiny", prompt=f"Hello {n}", **fields), settings)
            job.dispatched_at = utcnow() - timedelta(seconds=60) + timedelta(milliseconds=n)
            ids.append(job.id)
    return ids


def new_batch(sessions, settings, owner, rows, chunk_rows=2):
    """A batch of ``rows`` rows whose chunks the dispatcher has sent."""
    settings = settings.model_copy(update={"batches": settings.batches.model_copy(update={"chunk_rows": chunk_rows})})
    request = BatchCreate(model="tiny")
    data = io.BytesIO(("prompt\n" + "".join(f"row {n}\n" for n in range(rows))).encode())
    with transaction(sessions) as session:
        batch = batches.create_batch(session, owner, settings, request, read_rows(data, "csv", Upload.from_request(
            request, settings)), file_format="csv", filename="f.csv")
    send_chunks(sessions)
    return batch


def send_chunks(sessions):
    return in_session(sessions, lambda session: fairshare.claim_fair_chunks(session, utcnow(), 1000, 2))


def in_session(sessions, work):
    with transaction(sessions) as session:
        return work(session)


def test_an_unsent_job_is_claimed_for_sending_once(sessions, settings, owner):
    [job_id] = new_jobs(sessions, settings, owner, 1)
    in_session(sessions, lambda session: dispatch.release_jobs(session, [job_id]))
    now = utcnow()
    assert in_session(sessions, lambda session: dispatch.claim_due_jobs(session, now, 10)) == [(job_id, "tiny")]
    assert in_session(sessions, lambda session: dispatch.claim_due_jobs(session, now, 10)) == []
    with sessions() as session:
        assert session.get(Job, job_id).dispatched_at is not None


def test_a_retry_is_not_sent_before_its_delay(sessions, settings, owner):
    [job_id] = new_jobs(sessions, settings, owner, 1)
    settings = settings.model_copy(update={"retry_delay": 60})
    in_session(sessions, lambda session: claim_job(session, job_id))
    assert in_session(sessions, lambda session: break_down(session, settings, job_id)).requeued == [job_id]
    assert in_session(sessions, lambda session: dispatch.claim_due_jobs(session, utcnow(), 10)) == []
    later = utcnow() + timedelta(seconds=61)
    assert in_session(sessions, lambda session: dispatch.claim_due_jobs(session, later, 10)) == [(job_id, "tiny")]


def test_a_tribunal_row_is_never_sent_only_its_steps(sessions, settings, owner):
    from queue_engine import tribunal
    from queue_engine.schemas import TribunalCreate

    request = TribunalCreate(prompt="Hi", candidates=["tiny"], judge="tiny")
    parent, steps, _ = in_session(sessions, lambda session: tribunal.create_tribunal(
        session, owner, request, settings, tribunal.Decision(False)))
    in_session(sessions, lambda session: dispatch.release_jobs(session, [parent.id, steps[0].id]))
    claimed = in_session(sessions, lambda session: dispatch.claim_due_jobs(session, utcnow(), 10))
    assert claimed == [(steps[0].id, "tiny")]


def test_the_chunk_state_table_is_enforced(sessions):
    with pytest.raises(InvalidTransitionError, match="from 'taken' to 'sent'"):
        dispatch.chunk_transition(["taken"], "sent", [])
    with pytest.raises(InvalidTransitionError, match="from 'dropped' to 'pending'"):
        dispatch.chunk_transition(["sent", "dropped"], "pending", [])


def test_a_broker_that_lost_its_data_makes_what_it_held_unsent(sessions, settings, owner):
    """Queued jobs, sent chunks and queued webhook events are due again; work
    workers already took (running jobs, taken chunks) is left alone."""
    waiting, running = new_jobs(sessions, settings, owner, 2)
    in_session(sessions, lambda session: claim_job(session, running))
    batch = new_batch(sessions, settings, owner, 3)
    in_session(sessions, lambda session: claim_chunk(session, batch.id, 0))
    [done] = new_jobs(sessions, settings, owner, 1, webhook_url="https://example.org/hook")
    in_session(sessions, lambda session: claim_job(session, done))
    in_session(sessions, lambda session: succeed(session, settings, done))  # records its webhook event
    in_session(sessions, lambda session: webhooks.claim_due(session))

    forgotten = in_session(sessions, dispatch.forget_broker)

    assert forgotten == {"jobs": 1, "chunks": 1, "webhook_events": 1}
    with sessions() as session:
        assert session.get(Job, waiting).dispatched_at is None
        assert session.get(Job, running).dispatched_at is not None
        states = dict(session.execute(select(BatchChunk.chunk, BatchChunk.state)
                                      .where(BatchChunk.batch_id == batch.id)).all())
        assert states == {0: "taken", 1: "pending"}
        assert session.scalar(select(WebhookEvent.status)) == "pending"


def test_jobs_the_broker_is_missing_are_the_oldest_sent(sessions, settings, owner):
    """The broker holds fewer messages than the database marked sent: the queue is
    first in, first out, so the oldest are the ones it lost; recent sends are not judged yet."""
    first, second, third = new_jobs(sessions, settings, owner, 3)
    now = utcnow()
    with sessions() as session:
        at = dict(session.execute(select(Job.id, Job.dispatched_at)).all())
        assert dispatch.unaccounted_jobs(session, "tiny", 3, now) == set()
        assert dispatch.unaccounted_jobs(session, "tiny", 1, now) == {(first, at[first]), (second, at[second])}
        assert dispatch.unaccounted_jobs(session, "tiny", 0, at[second]) == {(first, at[first])}
        assert dispatch.unaccounted_jobs(session, "tiny-other", 0, now) == set()


def test_chunks_the_broker_is_missing_are_the_oldest_sent(sessions, settings, owner):
    batch = new_batch(sessions, settings, owner, 6)
    with transaction(sessions) as session:
        for chunk in range(3):
            session.execute(update(BatchChunk).where(BatchChunk.batch_id == batch.id, BatchChunk.chunk == chunk)
                            .values(dispatched_at=utcnow() - timedelta(seconds=10 - chunk)))
    with sessions() as session:
        missing = dispatch.unaccounted_chunks(session, "tiny", 1, utcnow())
    assert {key for key, _ in missing} == {(batch.id, 0), (batch.id, 1)}
    in_session(sessions, lambda session: dispatch.release_lost_chunks(session, missing))
    assert send_chunks(sessions) == [(batch.id, 0, "tiny"), (batch.id, 1, "tiny")]


def test_a_loss_found_by_two_dispatchers_is_sent_again_once(sessions, settings, owner):
    """Each released only if it is still as it was when found missing: the second release finds it sent again."""
    first, _ = new_jobs(sessions, settings, owner, 2)
    with sessions() as session:
        missing = dispatch.unaccounted_jobs(session, "tiny", 1, utcnow())
    assert {job_id for job_id, _ in missing} == {first}
    in_session(sessions, lambda session: dispatch.release_lost_jobs(session, missing))
    assert in_session(sessions, lambda session: dispatch.claim_due_jobs(session, utcnow(), 10)) == [(first, "tiny")]
    in_session(sessions, lambda session: dispatch.release_lost_jobs(session, missing))  # the other dispatcher
    assert in_session(sessions, lambda session: dispatch.claim_due_jobs(session, utcnow(), 10)) == []


@pytest.mark.postgres
def test_two_dispatchers_racing_on_postgresql_send_each_job_once(sessions, settings, owner, database_url):
    if not database_url.startswith("postgresql"):
        pytest.skip("SQLite has one writer at a time; the race needs PostgreSQL")
    ids = new_jobs(sessions, settings, owner, 40)
    in_session(sessions, lambda session: dispatch.release_jobs(session, ids))
    def claim(session):
        return [job_id for job_id, _ in dispatch.claim_due_jobs(session, utcnow(), 40)]

    first, second = race(sessions, [claim, claim])
    assert sorted(first + second) == sorted(ids) and not set(first) & set(second)
