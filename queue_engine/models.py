"""The SQLAlchemy models: API keys, uploaded files, batches, jobs (tribunal steps are jobs too)
and the webhook events they cause, with every delivery attempt; the SLURM
worker jobs the autoscaler runs, and its standing per model.

The schema changes only through Alembic migrations in ``migrations/``.
"""

import secrets
import time
from datetime import date, datetime, timezone

from sqlalchemy import JSON, BigInteger, Boolean, Date, DateTime, Float, ForeignKey, Index, Integer, String, Text, TypeDecorator, UniqueConstraint, false, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class UTCDateTime(TypeDecorator):
    """A timezone-aware UTC datetime on every database.

    SQLite stores no zone; this puts UTC back on the way out so comparisons
    and JSON output are the same on SQLite and PostgreSQL.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is not None and value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}; use datetime.now(timezone.utc)")
        return value

    def process_result_value(self, value, dialect):
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        return value


def utcnow():
    return datetime.now(timezone.utc)


def new_id(prefix="job"):
    """An id that sorts by creation time (milliseconds), then at random."""
    return f"{prefix}_{time.time_ns() // 1_000_000:012x}{secrets.token_hex(6)}"


class Base(DeclarativeBase):
    pass


class ApiKey(Base):
    """A client's key. Only the SHA-256 of the key is stored."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    key_prefix: Mapped[str] = mapped_column(String(16))
    webhook_secret: Mapped[str] = mapped_column(String(100))
    previous_webhook_secret: Mapped[str | None] = mapped_column(
        String(100), doc="the secret before the last rotation; also signs until previous_secret_until")
    previous_secret_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    share: Mapped[float] = mapped_column(
        Float, default=1.0, server_default="1", doc="its weight in the bulk lane's fair share between keys")
    is_operator: Mapped[bool] = mapped_column(
        Boolean, default=False, server_default=false(), doc="sees and may cancel every key's work, and all usage")
    # Quotas; None is unlimited.
    max_waiting_rows: Mapped[int | None] = mapped_column(BigInteger, doc="requests waiting or running at once")
    max_waiting_tokens: Mapped[int | None] = mapped_column(
        BigInteger, doc="tokens (estimated prompt + max_tokens) waiting or running at once")
    requests_per_minute: Mapped[int | None] = mapped_column(Integer, doc="API requests per minute")
    token_budget: Mapped[int | None] = mapped_column(BigInteger, doc="tokens per budget_period")
    budget_period: Mapped[str | None] = mapped_column(String(8), doc="day or month (UTC)")


class Batch(Base):
    """An uploaded file of prompts. Its rows are jobs of kind ``batch_item``.

    The counts are kept on this row, updated in the same transaction as the
    row changes they count, so reading progress costs one primary-key lookup
    however many rows the batch has.
    """

    __tablename__ = "batches"
    __table_args__ = (
        Index("ix_batches_owner_id_id", "owner_id", "id"),
        Index("ix_batches_model_status", "model", "status"),
        Index("ix_batches_expires_at", "status", "expires_at"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("api_keys.id"))
    model: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(20), default="in_progress")
    input_format: Mapped[str] = mapped_column(String(10))
    filename: Mapped[str | None] = mapped_column(String(255))
    id_column: Mapped[str] = mapped_column(String(200))
    params: Mapped[dict] = mapped_column(JSON, default=dict)
    webhook_url: Mapped[str | None] = mapped_column(Text)
    total: Mapped[int] = mapped_column(Integer, default=0)
    completed: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    cancelled: Mapped[int] = mapped_column(Integer, default=0)
    chunks: Mapped[int] = mapped_column(Integer, default=0)
    errors: Mapped[list | None] = mapped_column(JSON)
    meta: Mapped[dict | None] = mapped_column("metadata", JSON)
    endpoint: Mapped[str | None] = mapped_column(String(40), doc="a /v1 batch's endpoint, e.g. /v1/chat/completions")
    input_file_id: Mapped[str | None] = mapped_column(String(40), doc="a /v1 batch's input file")
    completion_window: Mapped[str | None] = mapped_column(String(20))
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime, doc="rows not ended by then are cancelled")
    prompt_tokens: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    completion_tokens: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    engine_seconds: Mapped[float] = mapped_column(
        Float, default=0.0, server_default="0", doc="the engine time of its finished rows (their shares of steps)")
    options: Mapped[dict | None] = mapped_column(
        JSON, doc="how its rows were made and how its results read: template, system, params_columns, "
                  "empty_cells, keep_columns, samples")
    columns: Mapped[list | None] = mapped_column(JSON, doc="the input file's header, in order (for keep_columns)")
    planned_tokens: Mapped[int] = mapped_column(
        BigInteger, default=0, server_default="0",
        doc="estimated tokens of its runnable rows at upload (prompt + max_tokens), for the waiting-tokens quota")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    cancelling_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    cancelled_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class File(Base):
    """A file uploaded through the OpenAI-compatible ``/v1/files``.

    The row holds what OpenAI's file object shows. An uploaded file's bytes
    are on disk under ``Settings.files_dir``, named by the id (``content`` is
    ``disk``); a batch's output and error files (``content`` ``output`` or
    ``error``) are written from its rows whenever they are read.
    """

    __tablename__ = "files"
    __table_args__ = (Index("ix_files_owner_id_id", "owner_id", "id"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("api_keys.id"))
    purpose: Mapped[str] = mapped_column(String(40))
    filename: Mapped[str] = mapped_column(String(255))
    bytes: Mapped[int] = mapped_column(BigInteger)
    batch_id: Mapped[str | None] = mapped_column(
        ForeignKey("batches.id", ondelete="CASCADE", name="fk_files_batch_id_batches"))
    content: Mapped[str] = mapped_column(String(10), default="disk", server_default="disk")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


#: A queued job that is carried by a message of its own (not a batch row, not
#: a tribunal, whose steps are the jobs that run).
WAITING_ALONE = "status = 'queued' AND batch_id IS NULL AND kind != 'tribunal'"
#: A job the API lists: a single job or a tribunal (not a batch row, not a tribunal's step).
TOP_LEVEL = "batch_id IS NULL AND parent_id IS NULL"


class Job(Base):
    """One unit of inference work, and the source of truth for its state.

    A queued job outside a batch is also its own outbox entry:
    ``dispatched_at`` is null until a message carrying it has gone to the
    broker (``queue_engine.dispatch``). Batch rows travel in chunks, whose
    outbox is :class:`BatchChunk`.
    """

    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("owner_id", "idempotency_key", name="uq_jobs_owner_idempotency_key"),
        Index("ix_jobs_owner_id_id", "owner_id", "id"),
        Index("ix_jobs_status", "status"),
        Index("ix_jobs_batch_row", "batch_id", "row_index", unique=True),
        Index("ix_jobs_batch_chunk", "batch_id", "chunk"),
        Index("ix_jobs_parent_id", "parent_id"),
        # The jobs that travel one message each (single jobs, tribunal steps)
        # while they wait: what the dispatcher sends and counts.
        Index("ix_jobs_waiting", "model", "dispatched_at",
              sqlite_where=text(WAITING_ALONE), postgresql_where=text(WAITING_ALONE)),
        # The newest single jobs and tribunals of a key (by id) and of all
        # keys (by time; see overview.recent_jobs), without walking past batch
        # rows; and the jobs that finished in the last minutes (tokens/s).
        Index("ix_jobs_top_level_owner", "owner_id", "id",
              sqlite_where=text(TOP_LEVEL), postgresql_where=text(TOP_LEVEL)),
        Index("ix_jobs_top_level_created", "created_at", "id",
              sqlite_where=text(TOP_LEVEL), postgresql_where=text(TOP_LEVEL)),
        Index("ix_jobs_finished_at", "finished_at"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("api_keys.id"))
    kind: Mapped[str] = mapped_column(String(20), default="single")
    model: Mapped[str] = mapped_column(String(200))
    lane: Mapped[str] = mapped_column(String(20), default="interactive")
    status: Mapped[str] = mapped_column(String(20), default="queued")
    prompt: Mapped[str | None] = mapped_column(Text)
    messages: Mapped[list | None] = mapped_column(JSON)
    params: Mapped[dict] = mapped_column(JSON, default=dict)
    meta: Mapped[dict | None] = mapped_column("metadata", JSON)
    webhook_url: Mapped[str | None] = mapped_column(Text)
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    request_hash: Mapped[str | None] = mapped_column(String(64))
    result_text: Mapped[str | None] = mapped_column(Text)
    output: Mapped[dict | None] = mapped_column(
        JSON, doc="what the answer holds besides its text: more samples (n), log probabilities")
    finish_reason: Mapped[str | None] = mapped_column(String(20))
    stream: Mapped[bool] = mapped_column(
        Boolean, default=False, server_default=false(),
        doc="its worker publishes the text as it is generated (a streamed /v1 request)")
    prompt_tokens: Mapped[int | None] = mapped_column(Integer)
    completion_tokens: Mapped[int | None] = mapped_column(Integer)
    cells: Mapped[dict | None] = mapped_column(
        JSON, doc="a batch row's input cells, column -> text, when its batch keeps them (keep_columns)")
    engine_seconds: Mapped[float | None] = mapped_column(
        Float, doc="its share of the engine steps it was in (a step's time split between its requests)")
    error_code: Mapped[str | None] = mapped_column(String(50))
    error_message: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(200))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    batch_id: Mapped[str | None] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE", name="fk_jobs_batch_id_batches"))
    row_index: Mapped[int | None] = mapped_column(
        Integer, doc="0-based position in the uploaded file, or a tribunal candidate's number")
    custom_id: Mapped[str | None] = mapped_column(String(255), doc="the row's id from the file")
    chunk: Mapped[int | None] = mapped_column(Integer, doc="the bulk-lane message that carries the row")
    parent_id: Mapped[str | None] = mapped_column(
        ForeignKey("jobs.id", ondelete="CASCADE", name="fk_jobs_parent_id_jobs"),
        doc="the tribunal this step belongs to (kind tribunal_step)")
    step: Mapped[str | None] = mapped_column(String(20), doc="candidate, critique, revision or single_pass")
    tribunal: Mapped[dict | None] = mapped_column(JSON, doc="a tribunal's request and trace (kind tribunal)")
    dispatched_at: Mapped[datetime | None] = mapped_column(
        UTCDateTime, doc="when a message carrying this job went to the broker; null while it needs one")
    retry_at: Mapped[datetime | None] = mapped_column(
        UTCDateTime, doc="a queued job's message is not sent before this (the delay of a retry)")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class BatchChunk(Base):
    """The rows of a batch that one bulk-lane message carries: the bulk lane's outbox.

    ``state`` says where the message is: ``pending`` (it needs sending, not
    before ``retry_at``), ``sent`` (the broker holds it), ``taken`` (a worker
    claimed the rows), ``dropped`` (the batch was cancelled before it ran).
    See ``queue_engine/dispatch.py``.
    """

    __tablename__ = "batch_chunks"
    __table_args__ = (Index("ix_batch_chunks_state", "state", "model", "dispatched_at"),)

    batch_id: Mapped[str] = mapped_column(
        ForeignKey("batches.id", ondelete="CASCADE", name="fk_batch_chunks_batch_id_batches"), primary_key=True)
    chunk: Mapped[int] = mapped_column(Integer, primary_key=True)
    model: Mapped[str] = mapped_column(String(200))
    state: Mapped[str] = mapped_column(String(16))
    dispatched_at: Mapped[datetime | None] = mapped_column(UTCDateTime, doc="when its message last went to the broker")
    retry_at: Mapped[datetime | None] = mapped_column(UTCDateTime, doc="a pending chunk is not sent before this")


class UsageDaily(Base):
    """What one key used of one model on one day (UTC): finished requests,
    tokens and engine time, added to in the transaction that stores each
    outcome, so usage and budgets are read from a few rows, not from jobs."""

    __tablename__ = "usage_daily"
    __table_args__ = (Index("ix_usage_daily_day", "day"),)

    owner_id: Mapped[int] = mapped_column(
        ForeignKey("api_keys.id", name="fk_usage_daily_owner_id_api_keys"), primary_key=True)
    model: Mapped[str] = mapped_column(String(200), primary_key=True)
    day: Mapped[date] = mapped_column(Date, primary_key=True)
    requests: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    prompt_tokens: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    completion_tokens: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    engine_seconds: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")


class WebhookEvent(Base):
    """One event to deliver (``job.completed``, ``batch.failed``...): the outbox.

    Written in the transaction that ends its job or batch, so an event exists
    if and only if the end was stored. Its ``id`` is the ``webhook-id`` header,
    the same on every attempt; ``body`` is the exact JSON sent each time.
    """

    __tablename__ = "webhook_events"
    __table_args__ = (
        Index("ix_webhook_events_due", "status", "next_attempt_at"),
        UniqueConstraint("job_id", name="uq_webhook_events_job_id"),
        UniqueConstraint("batch_id", name="uq_webhook_events_batch_id"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("api_keys.id"))
    job_id: Mapped[str | None] = mapped_column(
        ForeignKey("jobs.id", ondelete="CASCADE", name="fk_webhook_events_job_id_jobs"))
    batch_id: Mapped[str | None] = mapped_column(
        ForeignKey("batches.id", ondelete="CASCADE", name="fk_webhook_events_batch_id_batches"))
    type: Mapped[str] = mapped_column(String(40))
    url: Mapped[str] = mapped_column(Text)
    body: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(20), doc="pending, queued, sending, delivered or failed")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    round_start: Mapped[int] = mapped_column(
        Integer, default=0, doc="attempts made before the last redelivery; the retry schedule counts from here")
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    lease_expires_at: Mapped[datetime | None] = mapped_column(
        UTCDateTime, doc="while queued or sending: when the relay may send it again (a lost message, a dead sender)")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class WebhookDelivery(Base):
    """One attempt to deliver an event, whatever came of it."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (UniqueConstraint("event_id", "attempt", name="uq_webhook_deliveries_event_attempt"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    event_id: Mapped[str] = mapped_column(
        ForeignKey("webhook_events.id", ondelete="CASCADE", name="fk_webhook_deliveries_event_id_webhook_events"))
    attempt: Mapped[int] = mapped_column(Integer)
    status_code: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    duration_ms: Mapped[int] = mapped_column(Integer)
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class WorkerAllocation(Base):
    """One worker job submitted to (or adopted from) SLURM, from submission to its end.

    ``state`` is ours: ``pending`` (SLURM has not started it), ``starting``
    (running, the engine is loading), ``serving`` (the worker registered),
    ``stopping`` (told to stop), then how it ended: ``completed``,
    ``failed``, ``timeout``, ``cancelled`` or ``lost`` (SLURM no longer knows it).
    """

    __tablename__ = "worker_allocations"
    __table_args__ = (
        UniqueConstraint("deployment", "slurm_job_id", name="uq_worker_allocations_job"),
        Index("ix_worker_allocations_active", "deployment", "model", "ended_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    deployment: Mapped[str] = mapped_column(String(64))
    model: Mapped[str] = mapped_column(String(64))
    slurm_job_id: Mapped[str] = mapped_column(String(32))
    state: Mapped[str] = mapped_column(String(16))
    slurm_state: Mapped[str | None] = mapped_column(String(40), doc="SLURM's last word on it, e.g. PENDING, FAILED")
    node: Mapped[str | None] = mapped_column(String(255))
    adopted: Mapped[bool] = mapped_column(default=False, doc="found in squeue, not submitted by this autoscaler")
    submitted_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    serving_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    stop_requested_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    kill_requested_at: Mapped[datetime | None] = mapped_column(
        UTCDateTime, doc="when a stop that did not end in time was escalated to SIGKILL")
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    exit_reason: Mapped[str | None] = mapped_column(Text)


class ScalingState(Base):
    """The autoscaler's standing for one model: its last decision and its failures."""

    __tablename__ = "scaling_states"

    deployment: Mapped[str] = mapped_column(String(64), primary_key=True)
    model: Mapped[str] = mapped_column(String(64), primary_key=True)
    state: Mapped[str] = mapped_column(String(16), default="ok", doc="ok, backoff or error")
    failures: Mapped[int] = mapped_column(Integer, default=0, doc="worker jobs in a row that failed to start")
    retry_at: Mapped[datetime | None] = mapped_column(UTCDateTime, doc="no new job before this (back-off)")
    last_failure: Mapped[str | None] = mapped_column(Text)
    idle_since: Mapped[datetime | None] = mapped_column(UTCDateTime, doc="since when the backlog is zero")
    backlog: Mapped[int] = mapped_column(Integer, default=0)
    desired: Mapped[int] = mapped_column(Integer, default=0)
    action: Mapped[str] = mapped_column(String(16), default="hold", doc="up, down, hold or wait")
    reason: Mapped[str] = mapped_column(Text, default="")
    decided_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class LeaderLease(Base):
    """Which process acts for a role that only one may hold at a time (the
    autoscaler of a deployment), and until when, unless it renews."""

    __tablename__ = "leader_leases"

    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    holder: Mapped[str] = mapped_column(String(200))
    acquired_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
