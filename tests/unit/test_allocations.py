"""Worker allocations as the database keeps them: the worker's registration,
what counts as a failed start, the per-model counts and the failure state."""

from datetime import timedelta

from queue_engine import allocations
from queue_engine.db import transaction
from queue_engine.models import utcnow


def test_a_worker_registers_its_own_job_only_once(sessions):
    with transaction(sessions) as session:
        allocations.record_submitted(session, "dep", "tiny", "17")
    with transaction(sessions) as session:
        assert allocations.register_worker(session, "dep", "17", node="gpu01")
        assert not allocations.register_worker(session, "dep", "17", node="gpu01")  # already serving
        assert not allocations.register_worker(session, "other-dep", "17", node="gpu01")
        assert not allocations.register_worker(session, "dep", "18", node="gpu01")  # started by hand
    with transaction(sessions) as session:
        [allocation] = allocations.active(session, "dep", "tiny")
        assert (allocation.state, allocation.node) == ("serving", "gpu01")
        assert allocation.started_at is not None and allocation.serving_at is not None


def test_jobs_are_counted_by_model_and_state_until_they_end(sessions):
    with transaction(sessions) as session:
        for job_id in ("1", "2", "3"):
            allocations.record_submitted(session, "dep", "tiny", job_id)
        allocations.record_submitted(session, "dep", "big", "4")
        allocations.record_submitted(session, "elsewhere", "tiny", "5")
    with transaction(sessions) as session:
        first, second, third = allocations.active(session, "dep", "tiny")
        allocations.observe(first, "running", "RUNNING", "node1")
        allocations.request_stop(second)
        allocations.close(third, "failed", "FAILED", "FAILED (exit 1:0)")
    with transaction(sessions) as session:
        assert allocations.workers_by_state(session, "dep") == {
            "tiny": {"pending": 0, "starting": 1, "serving": 0, "stopping": 1},
            "big": {"pending": 1, "starting": 0, "serving": 0, "stopping": 0},
        }


def test_a_job_that_ends_before_serving_or_soon_after_failed_to_start(sessions):
    with transaction(sessions) as session:
        never, briefly, long, stopped = (allocations.record_submitted(session, "dep", "tiny", str(n))
                                         for n in range(4))
        now = utcnow()
        briefly.serving_at = now - timedelta(seconds=10)
        long.serving_at = now - timedelta(seconds=allocations.EARLY_EXIT_SECONDS + 1)
        allocations.request_stop(stopped)
        for allocation in (never, briefly, long, stopped):
            allocations.close(allocation, "failed", "FAILED", "exit 1", now=now)
        assert [allocations.failed_to_start(a) for a in (never, briefly, long, stopped)] == [True, True, False, False]


def test_failures_in_a_row_back_off_then_reach_the_error_state(sessions):
    with transaction(sessions) as session:
        state = allocations.scaling_state(session, "dep", "tiny")
        allocations.count_failure(state, "exit 1", delay=5, error_after=2)
        assert (state.state, state.failures) == ("backoff", 1)
        assert state.retry_at > utcnow()
        allocations.count_failure(state, "exit 1 again", delay=10, error_after=2)
        assert (state.state, state.failures, state.last_failure) == ("error", 2, "exit 1 again")
    with transaction(sessions) as session:
        state = allocations.scaling_state(session, "dep", "tiny")  # kept across restarts
        assert state.state == "error"
        allocations.clear_failures(state)
        assert (state.state, state.failures, state.retry_at) == ("ok", 0, None)


def test_a_registration_overwritten_by_an_older_copy_of_the_row_is_restored(sessions):
    with transaction(sessions) as session:
        allocations.record_submitted(session, "dep", "tiny", "21")
    with transaction(sessions) as autoscaler:
        [stale] = allocations.active(autoscaler, "dep", "tiny")  # read before the worker registers
        with transaction(sessions) as worker:
            assert allocations.register_worker(worker, "dep", "21", node="gpu01")
        allocations.observe(stale, "running", "RUNNING", "gpu01")  # writes state=starting over serving
    with transaction(sessions) as session:
        [allocation] = allocations.active(session, "dep", "tiny")
        assert allocation.state == "starting" and allocation.serving_at is not None
        allocations.observe(allocation, "running", "RUNNING", "gpu01")  # the next round
        assert allocation.state == "serving"


def test_a_worker_that_does_not_stop_within_the_grace_is_killed_once(sessions):
    """should_kill: only stopping jobs, only after stop_grace, and never a second time."""
    with transaction(sessions) as session:
        serving, stopping = (allocations.record_submitted(session, "dep", "tiny", str(n)) for n in (31, 32))
        told = utcnow()
        allocations.request_stop(stopping, now=told)
        later = told + timedelta(seconds=600)
        assert not allocations.should_kill(serving, 600, later)
        assert not allocations.should_kill(stopping, 600, told + timedelta(seconds=599))
        assert allocations.should_kill(stopping, 600, later)
        allocations.request_kill(stopping, now=later)
        assert not allocations.should_kill(stopping, 600, later + timedelta(seconds=600))
    with transaction(sessions) as session:
        [_, killed] = allocations.active(session, "dep", "tiny")
        assert killed.kill_requested_at == later  # stored


def test_a_killed_worker_is_closed_as_killed_and_not_as_a_failed_start(sessions):
    """The reason says it was killed after not stopping, then SLURM's words."""
    with transaction(sessions) as session:
        allocation = allocations.record_submitted(session, "dep", "tiny", "33")
        told = utcnow()
        allocation.serving_at = told - timedelta(seconds=5)  # served briefly: would be a failed start if not told
        allocations.request_stop(allocation, now=told)
        allocations.request_kill(allocation, now=told + timedelta(seconds=600))
        allocations.close(allocation, "cancelled", "CANCELLED", "CANCELLED (exit 0:9)",
                          now=told + timedelta(seconds=605))
        assert allocation.exit_reason == ("killed after not stopping within 600 s of the stop request; "
                                          "CANCELLED (exit 0:9)")
        assert allocation.state == "cancelled" and not allocations.failed_to_start(allocation)
