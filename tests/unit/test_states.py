"""The state tables of batches, worker allocations and webhook events, as a
specification: every move the table does not list is refused before any SQL
runs, and an allowed move is a conditional UPDATE that applies once (on
SQLite and PostgreSQL). Jobs' and chunks' tables are in ``test_jobs.py`` and
``test_dispatch.py``."""

import pytest
from sqlalchemy import select

from queue_engine import allocations, batches, webhooks
from queue_engine.allocations import AllocationState
from queue_engine.batches import BatchState
from queue_engine.db import transaction
from queue_engine.errors import InvalidTransitionError
from queue_engine.models import Batch, WebhookEvent, WorkerAllocation, new_id, utcnow
from queue_engine.webhooks import EventState
from tests.conftest import make_key


def refused(table):
    """Every ``(source, target)`` pair the table does not allow, as test parameters."""
    return [pytest.param(source, target, id=f"{source.value}->{target.value}")
            for source in table for target in table if target not in table[source]]


@pytest.fixture
def owner(sessions):
    return make_key(sessions, "alice")[1]


@pytest.mark.parametrize("table", [batches.ALLOWED, allocations.ALLOWED, webhooks.ALLOWED],
                         ids=["batch", "allocation", "event"])
def test_each_table_names_every_state_once(table):
    """Every state has a row, and a move leads only to states of the table."""
    states = type(next(iter(table)))
    assert set(table) == set(states)
    assert all(targets <= set(states) for targets in table.values())


# --- batches ---------------------------------------------------------------------


def test_batch_states_are_the_ones_that_happen():
    """``validating`` and ``finalizing`` are never stored; ended batches never move; only an
    in-progress batch expires (the expiry sweep, not settle)."""
    assert {state.value for state in BatchState} == {
        "in_progress", "completed", "failed", "cancelling", "cancelled", "expired"}
    assert [state for state, targets in batches.ALLOWED.items() if not targets] == [
        BatchState.COMPLETED, BatchState.FAILED, BatchState.CANCELLED, BatchState.EXPIRED]
    assert [state for state, targets in batches.ALLOWED.items() if BatchState.EXPIRED in targets] == [
        BatchState.IN_PROGRESS]


@pytest.mark.parametrize(("source", "target"), refused(batches.ALLOWED))
def test_batch_moves_not_in_the_table_are_refused(source, target):
    """A batch move the table does not list raises before any SQL is built."""
    with pytest.raises(InvalidTransitionError, match=f"a batch cannot go from '{source.value}' to '{target.value}'"):
        batches.batch_transition([(source, target)], [])


def test_every_end_settle_can_write_is_in_the_table():
    """settle's CASE is built from ENDINGS, and every one of them is an allowed move."""
    assert all(target in batches.ALLOWED[source] for source, target, _ in batches.ENDINGS)
    assert {target for _, target, _ in batches.ENDINGS} == {
        BatchState.COMPLETED, BatchState.FAILED, BatchState.CANCELLED}
    batches.batch_transition(batches.ENDINGS, [])  # builds: the table allows them all


def test_an_allowed_batch_move_applies_once(sessions, owner):
    """in_progress -> cancelling moves the batch; the same conditional move again moves nothing."""
    batch_id = new_id("batch")
    with transaction(sessions) as session:
        session.add(Batch(id=batch_id, owner_id=owner, model="tiny", status=BatchState.IN_PROGRESS.value,
                          input_format="csv", id_column="id", total=1, completed=0, failed=0, cancelled=0, chunks=1,
                          created_at=utcnow()))
    move = [(BatchState.IN_PROGRESS, BatchState.CANCELLING)]
    with transaction(sessions) as session:
        assert session.execute(batches.batch_transition(move, [Batch.id == batch_id])).rowcount == 1
    with transaction(sessions) as session:
        assert session.execute(batches.batch_transition(move, [Batch.id == batch_id])).rowcount == 0
        assert session.get(Batch, batch_id).status == "cancelling"


def test_settle_writes_the_first_ending_that_fits(sessions, owner):
    """With every row ended: cancelling -> cancelled, in_progress -> failed without a success, else completed."""
    ids = {}
    with transaction(sessions) as session:
        for name, status, completed, failed, cancelled in [
            ("cancel", "cancelling", 0, 0, 1), ("fail", "in_progress", 0, 1, 0),
            ("done", "in_progress", 1, 0, 0), ("busy", "in_progress", 0, 0, 0),
        ]:
            ids[name] = new_id("batch")
            session.add(Batch(id=ids[name], owner_id=owner, model="tiny", status=status, input_format="csv",
                              id_column="id", total=1, completed=completed, failed=failed, cancelled=cancelled,
                              chunks=1, created_at=utcnow()))
    with transaction(sessions) as session:
        assert [batches.settle(session, ids[name]) for name in ("cancel", "fail", "done", "busy")] == [
            True, True, True, False]
        assert [batches.settle(session, ids[name]) for name in ("cancel", "fail", "done")] == [False] * 3
    with sessions() as session:
        assert {name: session.get(Batch, batch_id).status for name, batch_id in ids.items()} == {
            "cancel": "cancelled", "fail": "failed", "done": "completed", "busy": "in_progress"}


# --- worker allocations ----------------------------------------------------------


@pytest.mark.parametrize(("source", "target"), refused(allocations.ALLOWED))
def test_allocation_moves_not_in_the_table_are_refused(source, target):
    """Neither a held row (move) nor a conditional UPDATE may make a move the table does not list."""
    allocation = WorkerAllocation(state=source.value)
    match = f"a worker allocation cannot go from '{source.value}' to '{target.value}'"
    with pytest.raises(InvalidTransitionError, match=match):
        allocations.move(allocation, target)
    assert allocation.state == source.value
    with pytest.raises(InvalidTransitionError, match=match):
        allocations.transition_statement([source], target, [])


def test_an_allowed_allocation_move_applies_once(sessions):
    """pending -> serving (a worker registering) moves the row; the same conditional move again moves nothing."""
    with transaction(sessions) as session:
        allocation_id = allocations.record_submitted(session, "dep", "tiny", "17").id
    move = ([AllocationState.PENDING], AllocationState.SERVING, [WorkerAllocation.id == allocation_id])
    with transaction(sessions) as session:
        assert session.execute(allocations.transition_statement(*move)).rowcount == 1
    with transaction(sessions) as session:
        assert session.execute(allocations.transition_statement(*move)).rowcount == 0
        assert session.get(WorkerAllocation, allocation_id).state == "serving"


def test_a_held_allocation_moves_with_its_values(sessions):
    """move() writes the state and its timestamp together; an ended allocation moves no more."""
    with transaction(sessions) as session:
        allocation = allocations.record_submitted(session, "dep", "tiny", "17")
        now = utcnow()
        allocations.move(allocation, AllocationState.STOPPING, stop_requested_at=now)
        assert (allocation.state, allocation.stop_requested_at) == ("stopping", now)
        allocations.close(allocation, "timeout", "TIMEOUT", "TIMEOUT (exit 0:15)")
        assert allocation.state == "timeout" and allocation.ended_at is not None
        with pytest.raises(InvalidTransitionError, match="from 'timeout' to 'stopping'"):
            allocations.request_stop(allocation)


def test_a_job_slurm_reports_no_end_for_is_closed_as_lost(sessions):
    """A kind that is not an end (SLURM gave no state) closes the allocation as lost, keeping SLURM's words."""
    with transaction(sessions) as session:
        allocation = allocations.record_submitted(session, "dep", "tiny", "17")
        allocations.close(allocation, "unknown", "", "? (exit ?)")
        assert (allocation.state, allocation.exit_reason) == ("lost", "? (exit ?)")


# --- webhook events --------------------------------------------------------------


@pytest.mark.parametrize(("source", "target"), refused(webhooks.ALLOWED))
def test_event_moves_not_in_the_table_are_refused(source, target):
    """A webhook event move the table does not list raises before any SQL is built."""
    match = f"a webhook event cannot go from '{source.value}' to '{target.value}'"
    with pytest.raises(InvalidTransitionError, match=match):
        webhooks.event_transition([source], target, [])


def test_an_allowed_event_move_applies_once(sessions, owner):
    """queued -> sending moves the event; the same conditional move again moves nothing."""
    with transaction(sessions) as session:
        event_id = webhooks.record_event(session, owner, "https://hooks.example.org/qe", "job.completed", {}).id
    with transaction(sessions) as session:
        assert webhooks.claim_due(session) == [event_id]  # pending -> queued
    move = ([EventState.QUEUED], EventState.SENDING, [WebhookEvent.id == event_id])
    with transaction(sessions) as session:
        assert session.execute(webhooks.event_transition(*move)).rowcount == 1
    with transaction(sessions) as session:
        assert session.execute(webhooks.event_transition(*move)).rowcount == 0
        assert session.scalar(select(WebhookEvent.status).where(WebhookEvent.id == event_id)) == "sending"
