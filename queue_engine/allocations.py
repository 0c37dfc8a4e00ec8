"""Worker allocations: the SLURM jobs that run workers, as the database keeps them.

The autoscaler writes a row when it submits a job (or finds one of its
deployment it did not know: adoption), moves it along as SLURM reports
(``pending`` -> ``starting``), and closes it when the job leaves the queue.
The worker itself marks the row ``serving`` when its engine is loaded and it
starts taking work, which is how pending and loading jobs are told from
serving ones. See :class:`~queue_engine.models.WorkerAllocation`.
"""

from datetime import timedelta
from enum import Enum

from sqlalchemy import func, select

from . import keys, states
from .models import ScalingState, WorkerAllocation, utcnow
from .schemas import ModelList, ModelStatus, ScalingOut


class AllocationState(str, Enum):
    PENDING = "pending"
    STARTING = "starting"
    SERVING = "serving"
    STOPPING = "stopping"
    # How it ended: SLURM's kinds of end (slurm/commands.py), or lost.
    COMPLETED = "completed"
    FAILED = "failed"
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"
    LOST = "lost"


#: The states of a job that left SLURM's queue.
ENDED = frozenset({AllocationState.COMPLETED, AllocationState.FAILED, AllocationState.TIMEOUT,
                   AllocationState.CANCELLED, AllocationState.LOST})

#: Which state may follow which. PENDING -> SERVING: the worker registered
#: before the autoscaler saw its job run; any job may end at any time.
ALLOWED = {
    AllocationState.PENDING: {AllocationState.STARTING, AllocationState.SERVING, AllocationState.STOPPING, *ENDED},
    AllocationState.STARTING: {AllocationState.SERVING, AllocationState.STOPPING, *ENDED},
    AllocationState.SERVING: {AllocationState.STOPPING, *ENDED},
    AllocationState.STOPPING: set(ENDED),
    **{end: set() for end in ENDED},
}

#: Our states of a job SLURM still runs or queues.
ACTIVE_STATES = tuple(state.value for state in AllocationState if state not in ENDED)


class ScalingHealth(str, Enum):
    """A model's standing after failed starts (``ScalingState.state``);
    written only by :func:`count_failure` and :func:`clear_failures`."""

    OK = "ok"
    BACKOFF = "backoff"
    ERROR = "error"
#: A worker that ends within this many seconds of serving counts as failed to start.
EARLY_EXIT_SECONDS = 60


def check_move(source, target):
    """``(source, target)`` as states, if the table allows the move.

    Raises:
        InvalidTransitionError: it does not.
    """
    return states.check_move(ALLOWED, source, target, "worker allocation")


def move(allocation, target, **values):
    """Move a loaded ``allocation`` (its row held by the caller's
    transaction) to ``target``, setting ``values`` with it.

    Raises:
        InvalidTransitionError: the table does not allow the move.
    """
    _, target = check_move(allocation.state, target)
    allocation.state = target.value
    for name, value in values.items():
        setattr(allocation, name, value)


def transition_statement(sources, target, where, **values):
    """The conditional UPDATE that moves every allocation matching ``where``
    from one of ``sources`` to ``target`` (for a row no one here holds)."""
    return states.move_statement(WorkerAllocation.state, ALLOWED, sources, target, where, values, "worker allocation")


def active(session, deployment, model):
    """The model's allocations that have not ended, oldest first."""
    query = (
        select(WorkerAllocation)
        .where(WorkerAllocation.deployment == deployment, WorkerAllocation.model == model,
               WorkerAllocation.ended_at.is_(None))
        .order_by(WorkerAllocation.id)
    )
    return list(session.scalars(query))


def record_submitted(session, deployment, model, job_id, adopted=False):
    allocation = WorkerAllocation(deployment=deployment, model=model, slurm_job_id=job_id,
                                  state=AllocationState.PENDING.value,
                                  slurm_state="PENDING", adopted=adopted, submitted_at=utcnow())
    session.add(allocation)
    session.flush()
    return allocation


def observe(allocation, kind, slurm_state, node, now=None):
    """Record what squeue says of a job that is still there (``kind``
    pending or running)."""
    allocation.slurm_state = slurm_state
    if kind == "running" and allocation.state == AllocationState.PENDING:
        move(allocation, AllocationState.STARTING, started_at=now or utcnow())
    if allocation.serving_at is not None and allocation.state in (AllocationState.PENDING, AllocationState.STARTING):
        # The worker registered while the autoscaler held an older copy of
        # the row, and its write put the state back; serving_at tells.
        move(allocation, AllocationState.SERVING)
    if node:
        allocation.node = node


def close(allocation, kind, slurm_state, reason, now=None):
    """The job left the queue: ``kind`` is how it ended (completed, failed,
    timeout, cancelled), or ``lost`` when SLURM no longer knows it (or
    reports no end: ``reason`` keeps its words). The reason of a job that
    was killed (:func:`request_kill`) says so first."""
    if allocation.kill_requested_at is not None:
        waited = (allocation.kill_requested_at - allocation.stop_requested_at).total_seconds()
        reason = f"killed after not stopping within {waited:.0f} s of the stop request; {reason}"
    end = AllocationState(kind) if kind in {state.value for state in ENDED} else AllocationState.LOST
    move(allocation, end, slurm_state=slurm_state or allocation.slurm_state, ended_at=now or utcnow(),
         exit_reason=reason)


def failed_to_start(allocation):
    """Whether an ended job counts against its profile: it was not told to
    stop, and it ended before serving or soon after."""
    if allocation.stop_requested_at is not None:
        return False
    return not served_long_enough(allocation, now=allocation.ended_at)


def served_long_enough(allocation, now=None):
    """Whether a worker has served past the window in which an exit counts as a failed start."""
    if allocation.serving_at is None:
        return False
    return (now or utcnow()) - allocation.serving_at >= timedelta(seconds=EARLY_EXIT_SECONDS)


def request_stop(allocation, now=None):
    """The job was told to stop (cancelled if it was not serving yet, SIGTERM if it was)."""
    move(allocation, AllocationState.STOPPING, stop_requested_at=now or utcnow())


def should_kill(allocation, stop_grace, now):
    """Whether a job still in SLURM's queue was told to stop at least
    ``stop_grace`` seconds before ``now`` and has not been killed yet.

    >>> from datetime import datetime, timezone
    >>> told = datetime(2026, 1, 1, 12, 0, tzinfo=timezone.utc)
    >>> stopping = WorkerAllocation(state="stopping", stop_requested_at=told)
    >>> [should_kill(stopping, 600, told + timedelta(seconds=s)) for s in (599, 600)]
    [False, True]
    """
    if allocation.state != AllocationState.STOPPING or allocation.kill_requested_at is not None:
        return False
    return (now - allocation.stop_requested_at).total_seconds() >= stop_grace


def request_kill(allocation, now=None):
    """The job was told to stop and did not: it was cancelled through SLURM
    (once; :func:`should_kill` is then False). It is still told to stop,
    so its end does not count as a failed start."""
    allocation.kill_requested_at = now or utcnow()


def register_worker(session, deployment, job_id, node):
    """A worker in SLURM job ``job_id`` is serving. Returns False if the
    job is not one of the deployment's allocations (started by hand)."""
    now = utcnow()
    result = session.execute(transition_statement(
        [AllocationState.PENDING, AllocationState.STARTING], AllocationState.SERVING,
        [WorkerAllocation.deployment == deployment, WorkerAllocation.slurm_job_id == job_id],
        serving_at=now, node=node, started_at=func.coalesce(WorkerAllocation.started_at, now)))
    return result.rowcount == 1


def workers_by_state(session, deployment):
    """``{model: {state: count}}`` of the deployment's active allocations."""
    query = (
        select(WorkerAllocation.model, WorkerAllocation.state, func.count())
        .where(WorkerAllocation.deployment == deployment, WorkerAllocation.ended_at.is_(None))
        .group_by(WorkerAllocation.model, WorkerAllocation.state)
    )
    counts = {}
    for model, state, count in session.execute(query):
        counts.setdefault(model, dict.fromkeys(ACTIVE_STATES, 0))[state] = count
    return counts


def scaling_state(session, deployment, model):
    """The model's :class:`~queue_engine.models.ScalingState`, created on first use."""
    state = session.get(ScalingState, (deployment, model))
    if state is None:
        state = ScalingState(deployment=deployment, model=model, state=ScalingHealth.OK.value, failures=0,
                             backlog=0, desired=0, action="hold", reason="not decided yet", decided_at=utcnow())
        session.add(state)
    return state


def scaling_states(session, deployment):
    """``{model: ScalingState}`` of the deployment."""
    return {s.model: s for s in session.scalars(select(ScalingState).where(ScalingState.deployment == deployment))}


def count_failure(state, why, delay, error_after, now=None):
    """One more failed start: back off for ``delay`` seconds; after
    ``error_after`` in a row the profile is in the error state."""
    now = now or utcnow()
    state.failures += 1
    state.last_failure = why
    state.retry_at = now + timedelta(seconds=delay)
    state.state = (ScalingHealth.ERROR if state.failures >= error_after else ScalingHealth.BACKOFF).value


def clear_failures(state):
    """A worker served long enough: the model is in good standing again."""
    state.failures = 0
    state.retry_at = None
    state.state = ScalingHealth.OK.value


def models_status(session, settings, reading):
    """Every model profile's load, workers and last scaling decision, as
    ``GET /api/v1/models`` shows them (:class:`~queue_engine.schemas.ModelList`).

    Args:
        reading: the backlog of every profile's queues (``load.read_backlog``).
    """
    deployment = settings.autoscaler.deployment
    workers = workers_by_state(session, deployment)
    states = scaling_states(session, deployment)
    data = []
    for model, profile in sorted(settings.models.items()):
        queues = {name: q for name, q in reading["queues"].items() if name in keys.model_queues(model)}
        state = states.get(model)
        data.append(ModelStatus(
            model=model,
            backlog=sum(q["requests"] for q in queues.values()),
            in_flight=sum(q["reserved"] for q in queues.values()),
            queues=queues,
            workers=workers.get(model, dict.fromkeys(ACTIVE_STATES, 0)),
            slurm=profile.slurm is not None,
            scaling=None if state is None else ScalingOut(
                state=state.state, action=state.action, desired=state.desired, reason=state.reason,
                decided_at=state.decided_at, failures=state.failures, retry_at=state.retry_at,
                last_failure=state.last_failure),
        ))
    return ModelList(data=data).model_dump(mode="json")
