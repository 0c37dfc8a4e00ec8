"""The run protocol (``queue_engine.leases``), on SQLite and PostgreSQL: a
worker claims a set of items in one transaction, renews their leases in one
statement, and finishes a set of outcomes in one transaction.

Items of every kind travel together: single jobs, tribunal steps and the
rows of batches. Each outcome is applied on its own merits (one item's
failure does not fail the set), and a claim or a finish costs a number of
statements that does not grow with the number of items.
"""

import io
from contextlib import contextmanager
from datetime import timedelta

import pytest
from sqlalchemy import event, select, update

from queue_engine import batches, jobs, leases, recovery, tribunal
from queue_engine.db import transaction
from queue_engine.errors import EngineRejectedError
from queue_engine.models import Batch, BatchChunk, Job, WebhookEvent, utcnow
from queue_engine.schemas import BatchCreate, JobCreate, TribunalCreate
from queue_engine.uploads import Upload, read_rows
from tests.conftest import make_key
from tests.work import Generated, send_chunks

LEASE = 30
HOOK = "https://hooks.example.org/qe"


@pytest.fixture
def owner(sessions):
    return make_key(sessions, "alice")[1]


# --- making work -------------------------------------------------------------


def new_job(sessions, settings, owner, prompt="Hello", **fields):
    with transaction(sessions) as session:
        return jobs.create_job(session, owner, JobCreate(model="tiny", prompt=prompt, **fields), settings)[0].id


def new_tribunal(sessions, settings, owner):
    """A tribunal of two candidates: returns ``(tribunal_id, [candidate step ids])``."""
    request = TribunalCreate(prompt="What is a list?", candidates=["tiny", "tiny"], judge="tiny", bypass="never")
    with transaction(sessions) as session:
        parent, steps, _ = tribunal.create_tribunal(session, owner, request, settings, tribunal.Decision(False))
    return parent.id, [step.id for step in steps]


def new_batch(sessions, settings, owner, prompts, webhook_url=None, chunk_rows=64):
    """A batch of ``prompts``, ``chunk_rows`` to a chunk (in the prompts' order), its chunks sent."""
    settings = settings.model_copy(update={"batches": settings.batches.model_copy(update={"chunk_rows": chunk_rows})})
    request = BatchCreate(model="tiny", webhook_url=webhook_url)
    data = io.BytesIO(("prompt\n" + "".join(f"{prompt}\n" for prompt in prompts)).encode())
    with transaction(sessions) as session:
        batch_id = batches.create_batch(session, owner, settings, request,
                                        read_rows(data, "csv", Upload.from_request(request, settings)),
                                        file_format="csv", filename="rows.csv").id
        send_chunks(session, settings)
    return batch_id


# --- the worker's side ---------------------------------------------------------


def claim(sessions, worker="w1", job_ids=(), chunks=()):
    with transaction(sessions) as session:
        return leases.claim(session, worker, LEASE, job_ids=job_ids, chunks=chunks)


def finish(sessions, settings, outcomes, worker="w1"):
    with transaction(sessions) as session:
        return leases.finish(session, worker, outcomes, settings)


def renew(sessions, job_ids, worker="w1"):
    with transaction(sessions) as session:
        return leases.renew(session, worker, job_ids, LEASE)


def success(item, text="done"):
    return leases.Outcome(item, Generated(text))


def rejection(item, message="the prompt is too long"):
    return leases.Outcome(item, error=EngineRejectedError(message))


def breakdown(item, message="CUDA error"):
    return leases.Outcome(item, error=RuntimeError(message))


# --- reading the database -------------------------------------------------------


def job(sessions, job_id):
    with sessions() as session:
        return session.get(Job, job_id)


def batch(sessions, batch_id):
    with sessions() as session:
        return session.get(Batch, batch_id)


def chunk(sessions, batch_id, number=0):
    with sessions() as session:
        return session.get(BatchChunk, (batch_id, number))


def events(sessions):
    with sessions() as session:
        return sorted(session.execute(select(WebhookEvent.type, WebhookEvent.job_id, WebhookEvent.batch_id)).all())


def lose_lease(sessions, settings, job_id):
    """The worker running ``job_id`` stopped renewing: its lease expires and
    the dispatcher puts the item back in the queue."""
    with transaction(sessions) as session:
        session.execute(update(Job).where(Job.id == job_id).values(lease_expires_at=utcnow() - timedelta(seconds=1)))
    with transaction(sessions) as session:
        assert recovery.recover_abandoned(session, settings, utcnow()) == (1, 0)


@contextmanager
def counting_statements(sessions):
    """Counts the statements sent to the database inside the block."""
    engine = sessions.kw["bind"]
    statements = []

    def count(connection, cursor, statement, parameters, context, executemany):
        statements.append(statement)

    event.listen(engine, "before_cursor_execute", count)
    try:
        yield statements
    finally:
        event.remove(engine, "before_cursor_execute", count)


# --- the specification -----------------------------------------------------------


def test_one_claim_and_one_finish_run_jobs_steps_and_rows_of_two_batches(sessions, settings, owner):
    # Single jobs: one succeeds (and has a webhook), one the engine rejects,
    # one meets an engine error with attempts left, one on its last attempt,
    # and one is cancelled while it runs.
    ok = new_job(sessions, settings, owner, webhook_url=HOOK)
    rejected = new_job(sessions, settings, owner)
    flaky = new_job(sessions, settings, owner)
    spent = new_job(sessions, settings, owner)
    cancelled = new_job(sessions, settings, owner)
    with transaction(sessions) as session:
        session.execute(update(Job).where(Job.id == spent).values(attempts=settings.max_attempts - 1))
    # A tribunal whose two candidates end together.
    parent, candidates = new_tribunal(sessions, settings, owner)
    # Batch A ends in this finish (two rows succeed, one is rejected); batch B
    # does not: a row succeeds, one is retried (chunk 0), one was lost by this
    # worker (chunk 1).
    batch_a = new_batch(sessions, settings, owner, ["a1", "a2", "a3"], webhook_url=HOOK)
    batch_b = new_batch(sessions, settings, owner, ["b1", "b2", "b3"], chunk_rows=2)
    job_ids = [ok, rejected, flaky, spent, cancelled, *candidates]
    chunks = [(batch_a, 0), (batch_b, 0), (batch_b, 1)]

    items = claim(sessions, job_ids=job_ids, chunks=chunks)

    assert len(items) == len(job_ids) + 6, "one transaction claims every queued item"
    by_id = {item.id: item for item in items}
    rows = {item.prompt: item for item in items if item.batch_id is not None}
    assert set(job_ids) <= set(by_id) and set(rows) == {"a1", "a2", "a3", "b1", "b2", "b3"}
    assert all(item.attempts == 1 for item in items if item.id != spent)
    assert by_id[spent].attempts == settings.max_attempts
    assert rows["a1"].params["max_tokens"] == 256, "a row's params start from its batch's"
    assert job(sessions, parent).status == "running", "a claimed step starts its tribunal"
    assert {chunk(sessions, *key).state for key in chunks} == {"taken"}
    assert claim(sessions, "w2", job_ids=job_ids, chunks=chunks) == [], "a duplicate claim takes nothing"

    # Meanwhile: the owner cancels a job, and this worker loses row b3.
    with transaction(sessions) as session:
        jobs.cancel_job(session, owner, cancelled)
    lose_lease(sessions, settings, rows["b3"].id)

    finished = finish(sessions, settings, [
        success(by_id[ok]), rejection(by_id[rejected]), breakdown(by_id[flaky]), breakdown(by_id[spent]),
        success(by_id[cancelled], "too late"),
        success(by_id[candidates[0]], "A list is mutable."), success(by_id[candidates[1]], "A list holds items."),
        success(rows["a1"]), success(rows["a2"]), rejection(rows["a3"]),
        success(rows["b1"]), breakdown(rows["b2"]), success(rows["b3"], "too late"),
    ])

    # What ended, what went back to the queue; the items no longer held are in neither.
    assert sorted(finished.ended) == sorted([
        ok, rejected, spent, *candidates, rows["a1"].id, rows["a2"].id, rows["a3"].id, rows["b1"].id])
    assert sorted(finished.requeued) == sorted([flaky, rows["b2"].id])
    # The single jobs, each on its own merits.
    assert (job(sessions, ok).status, job(sessions, ok).result_text) == ("succeeded", "done")
    assert (job(sessions, rejected).status, job(sessions, rejected).error_code) == ("failed", "engine_rejected")
    retried = job(sessions, flaky)
    assert (retried.status, retried.error_code, retried.lease_owner) == ("queued", "engine_error", None)
    assert retried.error_message == "RuntimeError: CUDA error" and retried.retry_at is not None
    lost_for_good = job(sessions, spent)
    assert (lost_for_good.status, lost_for_good.error_code) == ("failed", "engine_error")
    assert lost_for_good.error_message.startswith(f"failed after {settings.max_attempts} attempts")
    assert (job(sessions, cancelled).status, job(sessions, cancelled).result_text) == ("cancelled", None)
    # The tribunal: its two candidates ended in one transaction, which scheduled the critique, once.
    [(critique_id, model)] = finished.next_jobs
    critique = job(sessions, critique_id)
    assert (critique.parent_id, critique.step, critique.status, model) == (parent, "critique", "queued", "tiny")
    assert "A list is mutable." in critique.prompt and "A list holds items." in critique.prompt
    assert job(sessions, parent).status == "running"
    # Batch A ended with this finish; batch B goes on, its chunk due again after the retry's delay.
    ended = batch(sessions, batch_a)
    assert (ended.status, ended.completed, ended.failed, ended.cancelled) == ("completed", 2, 1, 0)
    assert ended.completed_at is not None
    going_on = batch(sessions, batch_b)
    assert (going_on.status, going_on.completed, going_on.failed) == ("in_progress", 1, 0), "b3 is not counted"
    assert job(sessions, rows["b2"].id).status == "queued" and job(sessions, rows["b3"].id).status == "queued"
    assert chunk(sessions, batch_b, 0).state == "pending" and chunk(sessions, batch_b, 0).retry_at is not None
    assert chunk(sessions, batch_b, 1).state == "pending", "the lost row's chunk was made pending by the dispatcher"
    # One event per end that has a webhook: the job's and batch A's.
    assert events(sessions) == sorted([("job.completed", ok, None), ("batch.completed", None, batch_a)])


def test_an_outcome_finished_twice_counts_once(sessions, settings, owner):
    """A worker that writes the same outcomes again (its first commit's
    answer was lost) changes nothing: they are no longer held."""
    batch_id = new_batch(sessions, settings, owner, ["r1", "r2"], webhook_url=HOOK)
    job_id = new_job(sessions, settings, owner, webhook_url=HOOK)
    items = claim(sessions, job_ids=[job_id], chunks=[(batch_id, 0)])
    outcomes = [success(item) for item in items]
    assert sorted(finish(sessions, settings, outcomes).ended) == sorted(item.id for item in items)
    assert finish(sessions, settings, outcomes) == ([], [], [], [])
    counted = batch(sessions, batch_id)
    assert (counted.status, counted.completed, counted.failed) == ("completed", 2, 0)
    assert len(events(sessions)) == 2


def test_a_late_step_of_a_cancelled_tribunal_schedules_nothing(sessions, settings, owner):
    parent, candidates = new_tribunal(sessions, settings, owner)
    items = claim(sessions, job_ids=candidates)
    with transaction(sessions) as session:
        jobs.cancel_job(session, owner, parent)
    assert finish(sessions, settings, [success(item) for item in items]) == ([], [], [], [])
    assert [job(sessions, step).status for step in candidates] == ["cancelled", "cancelled"]
    assert job(sessions, parent).status == "cancelled"


def test_renew_extends_what_the_worker_holds_and_names_exactly_what_it_lost(sessions, settings, owner):
    held, cancelled, taken_over = (new_job(sessions, settings, owner) for _ in range(3))
    batch_id = new_batch(sessions, settings, owner, ["r1", "r2"])
    items = claim(sessions, job_ids=[held, cancelled, taken_over], chunks=[(batch_id, 0)])
    rows = [item.id for item in items if item.batch_id is not None]
    with transaction(sessions) as session:
        jobs.cancel_job(session, owner, cancelled)
    lose_lease(sessions, settings, taken_over)
    assert [item.id for item in claim(sessions, "w2", job_ids=[taken_over])] == [taken_over]
    before = job(sessions, held).lease_expires_at

    assert renew(sessions, [held, cancelled, taken_over, *rows]) == {cancelled, taken_over}

    assert job(sessions, held).lease_expires_at > before
    assert job(sessions, taken_over).lease_owner == "w2", "the other worker's lease is left alone"
    assert renew(sessions, []) == set()


def test_claims_take_queued_items_only(sessions, settings, owner):
    """Items that are running elsewhere, finished, cancelled or unknown are left alone."""
    running, done, cancelled, queued = (new_job(sessions, settings, owner) for _ in range(4))
    elsewhere = claim(sessions, "w2", job_ids=[running, done])
    finish(sessions, settings, [success(item) for item in elsewhere if item.id == done], worker="w2")
    with transaction(sessions) as session:
        jobs.cancel_job(session, owner, cancelled)
    items = claim(sessions, job_ids=[running, done, cancelled, queued, "job_unknown"])
    assert [item.id for item in items] == [queued]
    assert job(sessions, running).lease_owner == "w2"


@pytest.mark.parametrize("kind", ["single jobs", "batch rows"])
def test_claim_and_finish_take_a_number_of_statements_independent_of_the_number_of_items(
        sessions, settings, owner, kind):
    def claim_and_finish(count):
        if kind == "single jobs":
            work = {"job_ids": [new_job(sessions, settings, owner, prompt=f"p{n}") for n in range(count)]}
        else:
            work = {"chunks": [(new_batch(sessions, settings, owner, [f"p{n}" for n in range(count)]), 0)]}
        with counting_statements(sessions) as claiming:
            items = claim(sessions, **work)
        assert len(items) == count
        with counting_statements(sessions) as finishing:
            finished = finish(sessions, settings, [success(item) for item in items])
        assert len(finished.ended) == count
        return len(claiming), len(finishing)

    assert claim_and_finish(5) == claim_and_finish(50)


def test_the_same_outcome_twice_in_one_finish_counts_once(sessions, settings, owner):
    """A set that names an item twice ends it once: the batch counts one row,
    and does not end while its other row still runs."""
    batch_id = new_batch(sessions, settings, owner, ["one", "two"])
    first, second = claim(sessions, chunks=[(batch_id, 0)])
    assert finish(sessions, settings, [success(first), success(first)]).ended == [first.id]
    assert (batch(sessions, batch_id).completed, batch(sessions, batch_id).status) == (1, "in_progress")
    assert job(sessions, second.id).status == "running"
