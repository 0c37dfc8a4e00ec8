"""The batch life cycle, on SQLite and PostgreSQL: claiming chunks, duplicate
chunk messages, counts that change with the rows, the batch's end, cancel,
and what the chunks' outbox records."""

import io

import pytest
from sqlalchemy import select, update

from queue_engine import batches, recovery
from queue_engine.db import transaction
from queue_engine.models import Batch, BatchChunk, Job, utcnow
from queue_engine.schemas import BatchCreate
from queue_engine.uploads import Upload, read_rows
from tests.conftest import make_key

LEASE = 30
MAX_ATTEMPTS = 2


@pytest.fixture
def owner(sessions):
    return make_key(sessions, "alice")[1]


def new_batch(sessions, settings, owner, prompts):
    request = BatchCreate(model="tiny")
    data = io.BytesIO(("prompt\n" + "".join(f"{p}\n" for p in prompts)).encode())
    reader = read_rows(data, "csv", Upload.from_request(request, settings))
    with transaction(sessions) as session:
        return batches.create_batch(session, owner, settings, request, reader, file_format="csv", filename="x.csv")


def claim(sessions, batch_id, chunk=0, worker="w1"):
    with transaction(sessions) as session:
        return batches.claim_chunk(session, batch_id, chunk, worker, LEASE)


def finish(sessions, batch_id, rows, worker="w1"):
    with transaction(sessions) as session:
        return batches.record_outcomes(session, batch_id, worker,
                                       generations=[(row.id, "text", "length", 3, 4) for row in rows])


def read(sessions, batch_id):
    with sessions() as session:
        return session.get(Batch, batch_id)


def chunk_states(sessions, batch_id):
    with sessions() as session:
        query = select(BatchChunk.chunk, BatchChunk.state).where(BatchChunk.batch_id == batch_id)
        return dict(session.execute(query).all())


def worker_died(sessions, settings, batch_id):
    """Expire the leases of the batch's rows, and let the dispatcher's recovery find them."""
    with transaction(sessions) as session:
        session.execute(update(Job).where(Job.batch_id == batch_id).values(lease_expires_at=utcnow()))
    with transaction(sessions) as session:
        return recovery.recover_abandoned(session, settings.model_copy(update={"max_attempts": MAX_ATTEMPTS}),
                                          utcnow())


def test_a_new_batch_records_its_chunks_as_sent(sessions, settings, owner):
    """The upload's transaction records one outbox row per chunk, marked sent (the web sends after commit)."""
    settings = settings.model_copy(update={"batches": settings.batches.model_copy(update={"chunk_rows": 2})})
    batch = new_batch(sessions, settings, owner, ["a", "b", "c", "d", "e"])
    assert batch.chunks == 3 and chunk_states(sessions, batch.id) == {0: "sent", 1: "sent", 2: "sent"}


def test_a_chunk_is_claimed_once(sessions, settings, owner):
    batch = new_batch(sessions, settings, owner, ["a", "b", "c"])
    first = claim(sessions, batch.id)
    assert sorted(row.attempts for row in first.rows) == [1, 1, 1]
    assert first.params["max_tokens"] == 256
    assert chunk_states(sessions, batch.id) == {0: "taken"}
    second = claim(sessions, batch.id, worker="w2")
    assert second.rows == [], "a duplicate message claims nothing: the rows are the first worker's"


def test_a_dead_workers_rows_are_queued_again_and_their_chunk_resent(sessions, settings, owner):
    batch = new_batch(sessions, settings, owner, ["a", "b", "c"])
    rows = claim(sessions, batch.id).rows
    assert finish(sessions, batch.id, rows[:2]) == (2, 0)
    assert worker_died(sessions, settings, batch.id) == (1, 0)
    assert chunk_states(sessions, batch.id) == {0: "pending"}, "the chunk needs a message again"
    again = claim(sessions, batch.id, worker="w2")
    assert [row.id for row in again.rows] == [rows[2].id] and again.rows[0].attempts == 2
    assert finish(sessions, batch.id, rows[2:], worker="w1") == (0, 0), "the dead worker's late result is refused"
    assert finish(sessions, batch.id, again.rows, worker="w2") == (1, 0)
    ended = read(sessions, batch.id)
    assert (ended.status, ended.completed, ended.failed) == ("completed", 3, 0)
    assert ended.completed_at is not None


def test_rows_whose_workers_keep_dying_fail_and_are_counted(sessions, settings, owner):
    batch = new_batch(sessions, settings, owner, ["a", "b"])
    for worker, found in (("w1", (2, 0)), ("w2", (0, 2))):
        assert len(claim(sessions, batch.id, worker=worker).rows) == 2
        assert worker_died(sessions, settings, batch.id) == found
    ended = read(sessions, batch.id)
    assert (ended.status, ended.failed) == ("failed", 2), "no row succeeded"
    with sessions() as session:
        assert set(session.scalars(select(Job.error_code).where(Job.batch_id == batch.id))) == {"worker_lost"}


def test_cancel_ends_queued_rows_now_and_the_batch_when_running_rows_end(sessions, settings, owner):
    settings = settings.model_copy(update={"batches": settings.batches.model_copy(update={"chunk_rows": 2})})
    batch = new_batch(sessions, settings, owner, ["a", "b", "c", "d", "e"])
    running = claim(sessions, batch.id, chunk=0).rows
    with transaction(sessions) as session:
        cancelling = batches.cancel_batch(session, owner, batch.id)
    assert (cancelling.status, cancelling.cancelled) == ("cancelling", 3)
    assert chunk_states(sessions, batch.id) == {0: "taken", 1: "dropped", 2: "dropped"}
    assert claim(sessions, batch.id, chunk=1).rows == [], "cancelled rows never start"
    finish(sessions, batch.id, running)
    ended = read(sessions, batch.id)
    assert (ended.status, ended.completed, ended.cancelled, ended.total) == ("cancelled", 2, 3, 5)


def test_rows_that_fail_for_good_are_counted_as_failed(sessions, settings, owner):
    batch = new_batch(sessions, settings, owner, ["a", "b"])
    rows = claim(sessions, batch.id).rows
    with transaction(sessions) as session:
        counts = batches.record_outcomes(session, batch.id, "w1", generations=[(rows[0].id, "t", "stop", 1, 1)],
                                         failures=[(rows[1].id, "engine_rejected", "too long")])
    assert counts == (1, 1)
    assert read(sessions, batch.id).status == "completed"


def test_rows_to_retry_go_back_to_the_queue_with_their_chunk_held_back(sessions, settings, owner):
    """An engine error: the row is queued again, its chunk pending until the retry's delay has passed."""
    batch = new_batch(sessions, settings, owner, ["a", "b"])
    rows = claim(sessions, batch.id).rows
    before = utcnow()
    with transaction(sessions) as session:
        assert batches.requeue_rows(session, batch.id, [Job.id == rows[0].id, Job.lease_owner == "w1"], 5,
                                    error_code="engine_error", error_message="boom") == 1
    with sessions() as session:
        chunk = session.get(BatchChunk, (batch.id, 0))
        row = session.get(Job, rows[0].id)
    assert (chunk.state, row.status, row.error_code) == ("pending", "queued", "engine_error")
    assert chunk.retry_at >= before


def test_rows_to_retry_in_a_cancelled_batch_are_cancelled(sessions, settings, owner):
    batch = new_batch(sessions, settings, owner, ["a", "b"])
    rows = claim(sessions, batch.id).rows
    with transaction(sessions) as session:
        batches.cancel_batch(session, owner, batch.id)
        batches.requeue_rows(session, batch.id, [Job.id.in_([row.id for row in rows])], 5)
    ended = read(sessions, batch.id)
    assert (ended.status, ended.cancelled) == ("cancelled", 2)
