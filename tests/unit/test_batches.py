"""The batch life cycle, on SQLite and PostgreSQL: claiming chunks, redelivered
chunks, counts that change with the rows, the batch's end, cancel."""

import io

import pytest
from sqlalchemy import select, update

from queue_engine import batches
from queue_engine.db import transaction
from queue_engine.models import Batch, Job, utcnow
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
        return batches.claim_chunk(session, batch_id, chunk, worker, LEASE, MAX_ATTEMPTS)


def finish(sessions, batch_id, rows, worker="w1"):
    with transaction(sessions) as session:
        return batches.record_outcomes(session, batch_id, worker,
                                       generations=[(row.id, "text", "length", 3, 4) for row in rows])


def read(sessions, batch_id):
    with sessions() as session:
        return session.get(Batch, batch_id)


def expire_leases(sessions, batch_id):
    with transaction(sessions) as session:
        session.execute(update(Job).where(Job.batch_id == batch_id).values(lease_expires_at=utcnow()))


def test_a_chunk_is_claimed_once(sessions, settings, owner):
    batch = new_batch(sessions, settings, owner, ["a", "b", "c"])
    first = claim(sessions, batch.id)
    assert sorted(row.attempts for row in first.rows) == [1, 1, 1]
    assert first.params["max_tokens"] == 256
    second = claim(sessions, batch.id, worker="w2")
    assert second.rows == [] and second.retry_in > LEASE - 1, "a live worker's rows are left to it"


def test_a_redelivered_chunk_runs_only_what_is_left(sessions, settings, owner):
    batch = new_batch(sessions, settings, owner, ["a", "b", "c"])
    rows = claim(sessions, batch.id).rows
    assert finish(sessions, batch.id, rows[:2]) == (2, 0)
    expire_leases(sessions, batch.id)  # w1 died
    again = claim(sessions, batch.id, worker="w2")
    assert [row.id for row in again.rows] == [rows[2].id] and again.rows[0].attempts == 2
    assert finish(sessions, batch.id, rows[2:], worker="w1") == (0, 0), "the dead worker's late result is refused"
    assert finish(sessions, batch.id, again.rows, worker="w2") == (1, 0)
    ended = read(sessions, batch.id)
    assert (ended.status, ended.completed, ended.failed) == ("completed", 3, 0)
    assert ended.completed_at is not None


def test_rows_whose_workers_keep_dying_fail_and_are_counted(sessions, settings, owner):
    batch = new_batch(sessions, settings, owner, ["a", "b"])
    for worker in ("w1", "w2"):
        claim(sessions, batch.id, worker=worker)
        expire_leases(sessions, batch.id)
    assert claim(sessions, batch.id, worker="w3").rows == []
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
