"""What the dashboard shows, read from the database: each model profile's
load, workers and tokens per second, a key's recent batches and jobs with
their progress, and one batch's or job's page.

Every reader takes the ``viewer`` (a :class:`~queue_engine.apikeys.KeyIdentity`):
an ordinary key reads only its own batches and jobs; an operator key reads
every key's. Model load is the service's, summed over all keys, and shown to
every key; what names machines or SLURM jobs (allocations, nodes, the last
failure's words) only to operators (:func:`shows_cluster_details`).

Each reader is a few index lookups, whatever the number of jobs: the recent
lists read the newest entries of indexes that hold no batch rows (migration
0012), the chart sums the jobs that finished in its window
(``ix_jobs_finished_at``).
"""

from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import Integer, cast, func, literal, select

from . import allocations, batches, jobs, load, webhooks
from .batches import ACTIVE, BatchState
from .keys import LANES, queue_name
from .models import ApiKey, Batch, Job, UTCDateTime, utcnow

#: How many batches and jobs the overview lists.
RECENT = 20
#: The tokens/s chart: its window and the seconds each of its points sums.
CHART_MINUTES = 15
CHART_STEP = 30


def shows_cluster_details(viewer):
    """Whether ``viewer`` sees SLURM job ids, nodes and failure messages."""
    return viewer.is_operator


# --- models ----------------------------------------------------------------------


@dataclass(frozen=True)
class TokenRate:
    """Completion tokens per second of one model, one point per ``step`` seconds, oldest first."""

    points: tuple
    step: int

    @property
    def now(self):
        """The rate over the last ``step`` seconds."""
        return self.points[-1]

    @property
    def peak(self):
        return max(self.points)


def token_rates(session, models, now=None, minutes=CHART_MINUTES, step=CHART_STEP):
    """``{model: TokenRate}``: the completion tokens of the jobs that finished
    in the last ``minutes``, per ``step`` seconds (tribunals are left out:
    their tokens are their steps')."""
    now = now or utcnow()
    count = minutes * 60 // step
    bucket = _seconds_before(session, now, Job.finished_at) / step
    bucket = func.floor(bucket) if session.get_bind().dialect.name == "postgresql" else bucket
    bucket = cast(bucket, Integer)  # on SQLite a cast truncates, which is floor here: never negative
    query = (
        select(Job.model, bucket, func.sum(Job.completion_tokens))
        .where(Job.finished_at > now - timedelta(seconds=count * step), Job.finished_at <= now,
               Job.model.in_(models), Job.kind != "tribunal", Job.completion_tokens.is_not(None))
        .group_by(Job.model, bucket)
    )
    sums = {model: [0] * count for model in models}
    for model, index, tokens in session.execute(query):
        if 0 <= index < count:
            sums[model][count - 1 - index] += tokens or 0
    return {model: TokenRate(tuple(tokens / step for tokens in values), step) for model, values in sums.items()}


def _seconds_before(session, now, column):
    """SQL: the seconds from ``column`` (a time) to ``now``."""
    if session.get_bind().dialect.name == "postgresql":
        return func.extract("epoch", literal(now, UTCDateTime()) - column)
    return (func.julianday(literal(now, UTCDateTime())) - func.julianday(column)) * 86400.0


def models_overview(session, settings, viewer, now=None):
    """Every model profile as ``GET /api/v1/models`` shows it
    (:func:`allocations.models_status`), with ``lanes`` (its queues by
    lane), ``tokens`` (a :class:`TokenRate`) and, for operators,
    ``allocations`` (its SLURM jobs not ended); for other keys
    ``allocations`` is None and the scaling's ``last_failure`` is left out."""
    names = list(settings.models)
    status = allocations.models_status(session, settings, load.read_backlog(session, names))["data"]
    rates = token_rates(session, names, now)
    details = shows_cluster_details(viewer)
    for item in status:
        model = item["model"]
        item["lanes"] = {lane: item["queues"][queue_name(model, lane)] for lane in LANES}
        item["tokens"] = rates[model]
        item["allocations"] = (
            allocations.active(session, settings.autoscaler.deployment, model) if details else None)
        if item["scaling"] is not None and not details:
            item["scaling"]["last_failure"] = None
    return status


# --- batches ---------------------------------------------------------------------


@dataclass(frozen=True)
class Progress:
    """How far a batch is: its counts, the rows per second it has run at, and
    the seconds it may still need at that rate (None when it is not running
    or nothing has finished yet)."""

    total: int
    completed: int
    failed: int
    cancelled: int
    rate: float | None
    eta_seconds: float | None

    @property
    def ended(self):
        return self.completed + self.failed + self.cancelled

    @property
    def remaining(self):
        return max(0, self.total - self.ended)

    @property
    def percent(self):
        return 100.0 * self.ended / self.total if self.total else 100.0

    @classmethod
    def of(cls, batch, now=None):
        """The progress of ``batch`` (a row or a :class:`Batch`): its rate is
        the rows that ran (completed or failed) per second since it was
        uploaded, until it ended."""
        end = batch.completed_at or batch.cancelled_at or now or utcnow()
        seconds = (end - batch.created_at).total_seconds()
        ran = batch.completed + batch.failed
        rate = ran / seconds if ran and seconds > 0 else None
        remaining = max(0, batch.total - batch.completed - batch.failed - batch.cancelled)
        running = batch.status == BatchState.IN_PROGRESS.value
        eta = remaining / rate if running and rate else None
        return cls(batch.total, batch.completed, batch.failed, batch.cancelled, rate, eta)


#: The columns the batch list shows (not the batch's parameters, errors or options).
BATCH_COLUMNS = (Batch.id, Batch.owner_id, Batch.model, Batch.status, Batch.filename, Batch.total, Batch.completed,
                 Batch.failed, Batch.cancelled, Batch.created_at, Batch.completed_at, Batch.cancelled_at)


def recent_batches(session, viewer, limit=RECENT, now=None):
    """The newest batches the viewer may see, each as ``(row, owner name, Progress)``."""
    query = select(*BATCH_COLUMNS, ApiKey.name).join(ApiKey, ApiKey.id == Batch.owner_id)
    if not viewer.is_operator:
        query = query.where(Batch.owner_id == viewer.id)
    rows = session.execute(query.order_by(Batch.id.desc()).limit(limit)).all()
    return [(row, row.name, Progress.of(row, now)) for row in rows]


def batch_page(session, viewer, batch_id, now=None):
    """One batch for its page: ``{batch, owner, progress, is_active, webhooks}``.

    Raises:
        NoSuchBatchError: no such batch, or another key's (for an ordinary key).
    """
    batch = batches.get_batch(session, viewer.id, batch_id, viewer.is_operator)
    return {
        "batch": batches.batch_to_dict(batch),
        "owner": _owner_name(session, batch.owner_id),
        "progress": Progress.of(batch, now),
        "is_active": batch.status in ACTIVE,
        "webhooks": webhook_attempts(session, batch_id=batch.id),
    }


# --- jobs ------------------------------------------------------------------------


#: The columns the job list shows (not the prompt, nor the answer).
JOB_COLUMNS = (Job.id, Job.owner_id, Job.kind, Job.model, Job.lane, Job.status, Job.error_code, Job.completion_tokens,
               Job.created_at, Job.started_at, Job.finished_at)


def recent_jobs(session, viewer, limit=RECENT):
    """The newest single jobs and tribunals the viewer may see (batch rows
    and tribunal steps are read through their batch or tribunal), each as
    ``(row, owner name)``.

    A key's are read by id (``ix_jobs_top_level_owner``), every key's by
    time (``ix_jobs_top_level_created``). Were the second index on the id
    alone, the planner could walk it for one key's list too, filtering by
    owner: slow for a key whose jobs are nearly all batch rows, which its
    statistics cannot tell.
    """
    query = (select(*JOB_COLUMNS, ApiKey.name).join(ApiKey, ApiKey.id == Job.owner_id)
             .where(Job.batch_id.is_(None), Job.parent_id.is_(None)))
    if viewer.is_operator:
        query = query.order_by(Job.created_at.desc(), Job.id.desc())
    else:
        query = query.where(Job.owner_id == viewer.id).order_by(Job.id.desc())
    return [(row, row.name) for row in session.execute(query.limit(limit))]


def latency(job):
    """Seconds from submission to the end, or None while it runs."""
    if job.finished_at is None:
        return None
    return (job.finished_at - job.created_at).total_seconds()


def job_page(session, viewer, job_id):
    """One job for its page: ``{job}`` (the API's job object, its tribunal
    trace included), ``prompt``, ``messages``, ``params``, ``owner``,
    ``latency``, ``is_active``, ``webhooks``.

    Raises:
        NoSuchJobError: no such job, or another key's (for an ordinary key).
    """
    job = jobs.get_job(session, viewer.id, job_id, viewer.is_operator)
    return {
        "job": jobs.job_to_dict(job),
        "prompt": job.prompt,
        "messages": job.messages,
        "params": job.params,
        "owner": _owner_name(session, job.owner_id),
        "latency": latency(job),
        "is_active": job.status in (jobs.JobState.QUEUED.value, jobs.JobState.RUNNING.value),
        "webhooks": webhook_attempts(session, job_id=job.id),
    }


# --- shared ----------------------------------------------------------------------


def webhook_attempts(session, job_id=None, batch_id=None):
    """Every delivery attempt of the job's or batch's webhook events, as the API lists them."""
    events = webhooks.events_of(session, job_id=job_id, batch_id=batch_id)
    return {"events": [webhooks.event_to_dict(event) for event in events],
            "attempts": [webhooks.attempt_to_dict(event, delivery)
                         for event, delivery in webhooks.deliveries_of(session, events)]}


def _owner_name(session, owner_id):
    return session.scalar(select(ApiKey.name).where(ApiKey.id == owner_id))

