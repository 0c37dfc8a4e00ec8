"""The batch life cycle, on SQLite and PostgreSQL: claiming chunks, duplicate
chunk messages, counts that change with the rows, the batch's end, cancel,
and what the chunks' outbox records."""

import io

import pytest
from sqlalchemy import select, update

from queue_engine import batches, leases, recovery
from queue_engine.db import transaction
from queue_engine.errors import EngineRejectedError
from queue_engine.models import Batch, BatchChunk, Job, utcnow
from queue_engine.schemas import BatchCreate
from queue_engine.uploads import Upload, read_rows
from tests.conftest import make_key
from tests.work import Generated, send_chunks

LEASE = 30
MAX_ATTEMPTS = 2


@pytest.fixture
def owner(sessions):
    return make_key(sessions, "alice")[1]


def new_batch(sessions, settings, owner, prompts, send=True):
    """A batch of ``prompts``, its chunks sent (as the dispatcher sends them) unless ``send`` is false."""
    request = BatchCreate(model="tiny")
    data = io.BytesIO(("prompt\n" + "".join(f"{p}\n" for p in prompts)).encode())
    reader = read_rows(data, "csv", Upload.from_request(request, settings))
    with transaction(sessions) as session:
        batch = batches.create_batch(session, owner, settings, request, reader, file_format="csv", filename="x.csv")
    if send:
        with transaction(sessions) as session:
            send_chunks(session, settings)
    return batch


def claim(sessions, batch_id, chunk=0, worker="w1"):
    """The rows of the chunk ``worker`` claimed (its items)."""
    with transaction(sessions) as session:
        return leases.claim(session, worker, LEASE, chunks=[(batch_id, chunk)])


def finish(sessions, settings, rows, worker="w1", error=None):
    """Finish the claimed ``rows`` with a generation each (or ``error``)."""
    outcomes = [leases.Outcome(row, None if error else Generated("text", "length", 3, 4), error) for row in rows]
    with transaction(sessions) as session:
        return leases.finish(session, worker, outcomes, settings)


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


def test_a_new_batch_records_its_chunks_pending_for_the_dispatcher(sessions, settings, owner):
    """The upload's transaction records one outbox row per chunk, pending: the
    dispatcher sends them a window at a time, by fair share."""
    settings = settings.model_copy(update={"batches": settings.batches.model_copy(update={"chunk_rows": 2})})
    batch = new_batch(sessions, settings, owner, ["a", "b", "c", "d", "e"], send=False)
    assert batch.chunks == 3 and chunk_states(sessions, batch.id) == {0: "pending", 1: "pending", 2: "pending"}


def test_a_chunk_is_claimed_once(sessions, settings, owner):
    batch = new_batch(sessions, settings, owner, ["a", "b", "c"])
    first = claim(sessions, batch.id)
    assert sorted(row.attempts for row in first) == [1, 1, 1]
    assert all(row.params["max_tokens"] == 256 and row.batch_id == batch.id for row in first), "the batch's params"
    assert chunk_states(sessions, batch.id) == {0: "taken"}
    second = claim(sessions, batch.id, worker="w2")
    assert second == [], "a duplicate message claims nothing: the rows are the first worker's"


def test_a_dead_workers_rows_are_queued_again_and_their_chunk_resent(sessions, settings, owner):
    batch = new_batch(sessions, settings, owner, ["a", "b", "c"])
    rows = claim(sessions, batch.id)
    assert len(finish(sessions, settings, rows[:2]).ended) == 2
    assert worker_died(sessions, settings, batch.id) == (1, 0)
    assert chunk_states(sessions, batch.id) == {0: "pending"}, "the chunk needs a message again"
    again = claim(sessions, batch.id, worker="w2")
    assert [row.id for row in again] == [rows[2].id] and again[0].attempts == 2
    late = finish(sessions, settings, rows[2:], worker="w1")
    assert late == ([], [], [], []), "the dead worker's late result is refused"
    assert finish(sessions, settings, again, worker="w2").ended == [rows[2].id]
    ended = read(sessions, batch.id)
    assert (ended.status, ended.completed, ended.failed) == ("completed", 3, 0)
    assert ended.completed_at is not None


def test_rows_whose_workers_keep_dying_fail_and_are_counted(sessions, settings, owner):
    batch = new_batch(sessions, settings, owner, ["a", "b"])
    for worker, found in (("w1", (2, 0)), ("w2", (0, 2))):
        assert len(claim(sessions, batch.id, worker=worker)) == 2
        assert worker_died(sessions, settings, batch.id) == found
    ended = read(sessions, batch.id)
    assert (ended.status, ended.failed) == ("failed", 2), "no row succeeded"
    with sessions() as session:
        assert set(session.scalars(select(Job.error_code).where(Job.batch_id == batch.id))) == {"worker_lost"}


def test_cancel_ends_queued_rows_now_and_the_batch_when_running_rows_end(sessions, settings, owner):
    settings = settings.model_copy(update={"batches": settings.batches.model_copy(update={"chunk_rows": 2})})
    batch = new_batch(sessions, settings, owner, ["a", "b", "c", "d", "e"])
    running = claim(sessions, batch.id, chunk=0)
    with transaction(sessions) as session:
        cancelling = batches.cancel_batch(session, owner, batch.id)
    assert (cancelling.status, cancelling.cancelled) == ("cancelling", 3)
    assert chunk_states(sessions, batch.id) == {0: "taken", 1: "dropped", 2: "dropped"}
    assert claim(sessions, batch.id, chunk=1) == [], "cancelled rows never start"
    finish(sessions, settings, running)
    ended = read(sessions, batch.id)
    assert (ended.status, ended.completed, ended.cancelled, ended.total) == ("cancelled", 2, 3, 5)


def test_rows_that_fail_for_good_are_counted_as_failed(sessions, settings, owner):
    batch = new_batch(sessions, settings, owner, ["a", "b"])
    rows = claim(sessions, batch.id)
    with transaction(sessions) as session:
        finished = leases.finish(session, "w1", [leases.Outcome(rows[0], Generated("t")),
                                                 leases.Outcome(rows[1], error=EngineRejectedError("too long"))],
                                 settings)
    assert sorted(finished.ended) == sorted(row.id for row in rows)
    ended = read(sessions, batch.id)
    assert (ended.status, ended.completed, ended.failed) == ("completed", 1, 1)


def test_rows_to_retry_go_back_to_the_queue_with_their_chunk_held_back(sessions, settings, owner):
    """An engine error: the row is queued again, its chunk pending until the retry's delay has passed."""
    batch = new_batch(sessions, settings, owner, ["a", "b"])
    rows = claim(sessions, batch.id)
    before = utcnow()
    assert finish(sessions, settings, rows[:1], error=RuntimeError("boom")).requeued == [rows[0].id]
    with sessions() as session:
        chunk = session.get(BatchChunk, (batch.id, 0))
        row = session.get(Job, rows[0].id)
    assert (chunk.state, row.status, row.error_code) == ("pending", "queued", "engine_error")
    assert chunk.retry_at >= before


def test_rows_to_retry_in_a_cancelled_batch_are_cancelled(sessions, settings, owner):
    batch = new_batch(sessions, settings, owner, ["a", "b"])
    rows = claim(sessions, batch.id)
    with transaction(sessions) as session:
        batches.cancel_batch(session, owner, batch.id)
    finish(sessions, settings, rows, error=RuntimeError("boom"))
    ended = read(sessions, batch.id)
    assert (ended.status, ended.cancelled) == ("cancelled", 2)
