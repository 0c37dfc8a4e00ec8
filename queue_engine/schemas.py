"""The request and response shapes of the public API, as pydantic models.

The web layer validates with these and the OpenAPI document is generated
from them, so the contract and the checks cannot drift apart.

Every entry point reads JSON text with :func:`queue_engine.inputs.read_json`,
which refuses what no field may hold (deep nesting, ``NaN``, NUL characters,
unpaired surrogates); then the models check each field strictly: ``"5"`` is
not a number, ``true`` is not an integer and ``1`` is not a string.
"""

from datetime import date, datetime
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from .inputs import check_not_blank
from .params import Params, StrictModel, text_type
from .templates import Template

Lane = Literal["interactive", "bulk"]

#: Text with more than white space in it: a prompt, a message.
NonBlankText = Annotated[text_type(json_schema_extra={"pattern": r"\S"}), AfterValidator(check_not_blank)]
#: A model profile's or a CSV column's name.
Name = text_type(min_length=1, max_length=200)
WebhookUrl = text_type(max_length=2048,
                       json_schema_extra={"format": "uri", "pattern": "^[Hh][Tt][Tt][Pp][Ss]?://[^/?#]"})
Metadata = dict[text_type(max_length=64), text_type(max_length=512)]


# --- requests ---------------------------------------------------------------------


#: Longest batch template or system message, in characters.
MAX_TEMPLATE_CHARS = 100_000
MESSAGE_ROLES = ("system", "user", "assistant")


class Message(StrictModel):
    role: Literal[MESSAGE_ROLES]
    content: NonBlankText


#: Stated in the OpenAPI document; ``_check_prompt_or_messages`` enforces it.
#: A null prompt or messages counts as absent, as the server reads it.
ONE_INPUT = {"oneOf": [
    {"required": ["prompt"], "properties": {"prompt": {"type": "string"}}},
    {"required": ["messages"], "properties": {"messages": {"type": "array"}}},
]}


def _check_prompt_or_messages(request):
    if (request.prompt is None) == (request.messages is None):
        raise ValueError("give exactly one of 'prompt' or 'messages'")
    return request


def _check_http_url(url):
    if url is not None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL with a host")
    return url


class JobCreate(StrictModel):
    """The body of ``POST /api/v1/jobs``."""

    model_config = ConfigDict(json_schema_extra=ONE_INPUT)

    model: Name = Field(description="a configured model profile")
    prompt: NonBlankText | None = Field(None, description="plain text prompt; or give messages")
    messages: list[Message] | None = Field(None, min_length=1, max_length=256, description="chat messages")
    params: Params = Field(default_factory=Params)
    webhook_url: WebhookUrl | None = Field(None, description="called when the job ends")
    metadata: Metadata | None = Field(None, max_length=16, description="up to 16 string pairs, kept with the job")
    priority: Lane = Field("interactive", description="the lane: interactive (default) or bulk")

    _one_input = model_validator(mode="after")(_check_prompt_or_messages)

    _http_only = field_validator("webhook_url")(_check_http_url)


BypassMode = Literal["auto", "never", "always"]


class TribunalCreate(StrictModel):
    """The body of ``POST /api/v1/tribunals``."""

    model_config = ConfigDict(json_schema_extra=ONE_INPUT)

    prompt: NonBlankText | None = Field(None, description="plain text prompt; or give messages")
    messages: list[Message] | None = Field(None, min_length=1, max_length=256, description="chat messages")
    candidates: list[Name] = Field(
        min_length=1, description="a model profile per candidate answer; a model may appear more than once")
    judge: Name = Field(description="the model that critiques the candidates")
    reviser: Name | None = Field(None, description="writes the final answer; default the judge")
    bypass: BypassMode = Field("auto", description="auto: a single pass when the queues are backed up")
    params: Params = Field(default_factory=Params, description="sampling parameters of every step")
    webhook_url: WebhookUrl | None = Field(None, description="called when the tribunal ends")
    metadata: Metadata | None = Field(None, max_length=16, description="up to 16 string pairs, kept with the job")

    _one_input = model_validator(mode="after")(_check_prompt_or_messages)

    _http_only = field_validator("webhook_url")(_check_http_url)


class CandidateTrace(BaseModel):
    model: str
    seed: int
    text: str | None = Field(description="null until this candidate has answered")


class TribunalTrace(BaseModel):
    """What a tribunal did, step by step (the ``tribunal`` field of its job)."""

    bypass: BypassMode
    bypassed: bool
    reason: str | None = Field(description="why it ran as a single pass, in words")
    readings: dict | None = Field(description="the queue readings the bypass decision was made on")
    candidates: list[CandidateTrace]
    judge: str
    reviser: str
    critique: str | None
    final: str | None


class JobResult(BaseModel):
    text: str
    finish_reason: str | None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int


class ErrorInfo(BaseModel):
    code: str
    message: str


class JobOut(BaseModel):
    """The job object, as every endpoint returns it."""

    id: str
    kind: Literal["single", "tribunal", "batch_item"]
    model: str
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    priority: Lane
    result: JobResult | None
    usage: Usage | None
    error: ErrorInfo | None
    attempts: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    metadata: dict[str, str] | None
    batch_id: str | None = Field(None, description="the batch this row belongs to (kind batch_item)")
    custom_id: str | None = Field(None, description="the row's id in its batch file")
    tribunal: TribunalTrace | None = Field(None, description="the steps of a tribunal (kind tribunal)")


class JobList(BaseModel):
    data: list[JobOut]
    next_cursor: str | None


BatchStatus = Literal["validating", "in_progress", "finalizing", "completed", "failed", "cancelling", "cancelled", "expired"]


class BatchCreate(StrictModel):
    """The form fields of ``POST /api/v1/batches`` (the file comes beside them)."""

    model: Name = Field(description="a configured model profile")
    prompt_column: Name = Field("prompt", description="CSV column holding the prompt")
    id_column: Name | None = Field(
        None, description="CSV column holding each row's unique id (default 'id'; without one, rows are numbered from 1)")
    delimiter: text_type(min_length=1, max_length=1) | None = Field(
        None, description="CSV delimiter; sniffed when omitted")
    params: Params = Field(default_factory=Params, description="sampling parameters for every row (JSON text)")
    webhook_url: WebhookUrl | None = Field(None, description="called when the batch ends")
    template: text_type(min_length=1, max_length=MAX_TEMPLATE_CHARS) | None = Field(
        None, description="CSV only, instead of prompt_column: each row's prompt is this text with every "
                          "{column} placeholder filled from the row's cells ({{ and }} are literal braces)")
    system: NonBlankText | None = Field(
        None, max_length=MAX_TEMPLATE_CHARS,
        description="CSV only: a system message; rows become chat messages [system, user: the prompt]")
    params_columns: dict[text_type(min_length=1, max_length=64), Name] | None = Field(
        None, description="CSV only (JSON text): parameter name -> column; each row's parameter is its cell, "
                          "checked as params are (an empty cell keeps the batch's value)")
    empty_cells: Literal["fail", "empty"] | None = Field(
        None, description="CSV with a template: a row whose placeholder cell is empty fails (fail, the default) "
                          "or gets it filled in empty")
    keep_columns: bool | None = Field(
        None, description="CSV only (true/false): keep the header and every row's cells, for the results")
    samples: Literal["rows", "columns"] | None = Field(
        None, description="with n > 1, how the results lay out a row's samples: one line each, with a sample "
                          "column (rows, the default), or side by side, text_0, text_1, ... (columns)")

    _http_only = field_validator("webhook_url")(_check_http_url)

    @field_validator("template")
    @classmethod
    def _template_parses(cls, template):
        if template is not None:
            Template.parse(template)
        return template

    @field_validator("params_columns")
    @classmethod
    def _known_params(cls, params_columns):
        for name in params_columns or ():
            if name not in Params.model_fields or name == "max_completion_tokens":
                raise ValueError(f"{name!r} is not a parameter; use one of "
                                 f"{', '.join(n for n in Params.model_fields if n != 'max_completion_tokens')}")
        return params_columns


class RequestCounts(BaseModel):
    total: int
    completed: int
    failed: int
    cancelled: int


class BatchUsage(BaseModel):
    """What a batch's finished rows used, so far (read from the batch row, not its rows)."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    engine_seconds: float = Field(description="its rows' shares of the engine steps they ran in")


class BatchOut(BaseModel):
    """The batch object, as every endpoint returns it."""

    id: str
    status: BatchStatus
    model: str
    request_counts: RequestCounts
    usage: BatchUsage
    created_at: datetime
    completed_at: datetime | None
    cancelled_at: datetime | None
    errors: list[dict] | None
    format: Literal["csv", "jsonl"]
    filename: str | None
    params: dict


class BatchList(BaseModel):
    data: list[BatchOut]
    next_cursor: str | None


class RowError(BaseModel):
    """Why one row of a file cannot run."""

    line: int | None = Field(None, description="the file line its record starts on")
    id: str
    code: str = Field(description="empty_prompt, prompt_too_long, empty_cell, invalid_param, ...")
    message: str


class PreviewRow(BaseModel):
    """A row as the batch would store it: its prompt or chat messages, its own parameters."""

    id: str
    prompt: str | None
    messages: list[dict] | None
    params: dict = Field(description="what the row sets itself (the batch's params apply to the rest)")
    error: dict | None = Field(description="{code, message} when the row would fail")


class BatchDryRun(BaseModel):
    """``POST /api/v1/batches?dry_run=true``: the upload checked and read in full; nothing stored or sent."""

    dry_run: Literal[True]
    model: str
    format: Literal["csv", "jsonl"]
    rows: int
    runnable_rows: int
    failed_rows: int
    row_errors: list[RowError] = Field(description="the first failed rows (at most 10)")
    prompt_tokens: int = Field(description="the runnable rows' prompt tokens")
    tokens_counted_with: Literal["tokenizer", "estimate"] = Field(
        description="the model's tokenizer, or an estimate of 4 characters a token when it cannot be loaded")
    tokenizer_error: str | None = Field(description="why the tokenizer could not be loaded")
    planned_tokens: int = Field(description="the estimate the waiting-tokens quota counts (prompt + max_tokens)")
    columns: list[str] | None = Field(description="a CSV file's header")
    options: dict | None = Field(description="what the batch would store as its options")
    first_rows: list[PreviewRow] = Field(description="the first 5 rows")


class UsageTotals(BaseModel):
    """What finished requests used: each request that ended with a generation counts."""

    requests: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    engine_seconds: float = Field(description="the requests' shares of the engine steps they ran in")


class UsageRow(UsageTotals):
    """One group's usage; it holds the field it is grouped by."""

    key: str | None = Field(None, description="the key's name (group_by=key)")
    model: str | None = Field(None, description="the model profile (group_by=model)")
    day: date | None = Field(None, description="the day, UTC (group_by=day)")


class UsageReport(BaseModel):
    """``GET /api/v1/usage``: usage over a period of days (both included)."""

    model_config = ConfigDict(populate_by_name=True)

    date_from: date = Field(alias="from")
    date_to: date = Field(alias="to")
    group_by: Literal["key", "model", "day"]
    data: list[UsageRow]
    total: UsageTotals


EventType = Literal["job.completed", "job.failed", "batch.completed", "batch.failed", "batch.cancelled", "batch.expired"]


class WebhookAttempt(BaseModel):
    """One attempt to deliver a webhook event."""

    webhook_id: str = Field(description="the event's id, sent as the webhook-id header on every attempt")
    event: EventType
    attempt: int = Field(description="1 for the first attempt")
    status_code: int | None = Field(description="the receiver's HTTP status; null when it did not answer")
    error: str | None = Field(description="what went wrong, in words; null on a 2xx")
    duration_ms: int
    at: datetime


class WebhookEventOut(BaseModel):
    """A webhook event and where its delivery stands."""

    webhook_id: str
    event: EventType
    url: str
    status: Literal["pending", "queued", "sending", "delivered", "failed"] = Field(
        description="pending: waiting for its (next) attempt; delivered: a 2xx came back; failed: given up")
    attempts: int
    next_attempt_at: datetime | None
    created_at: datetime
    ended_at: datetime | None


class WebhookAttemptList(BaseModel):
    data: list[WebhookAttempt] = Field(description="every attempt, in order")
    events: list[WebhookEventOut] = Field(description="the events the attempts belong to")


class WorkerCounts(BaseModel):
    """A model's SLURM worker jobs that have not ended, by state."""

    pending: int = Field(description="waiting in SLURM's queue")
    starting: int = Field(description="running, the engine is loading")
    serving: int = Field(description="the worker registered and takes work")
    stopping: int = Field(description="told to stop; finishing what it holds")


class ScalingOut(BaseModel):
    """The autoscaler's last decision for a model, and why."""

    state: Literal["ok", "backoff", "error"] = Field(
        description="backoff: a worker job failed to start and replacements wait; error: it failed repeatedly")
    action: Literal["up", "down", "hold", "wait"]
    desired: int
    reason: str
    decided_at: datetime
    failures: int = Field(description="worker jobs in a row that failed to start")
    retry_at: datetime | None = Field(description="no new worker job before this")
    last_failure: str | None


class ModelStatus(BaseModel):
    """One model profile: its load, its workers, its scaling."""

    model: str
    backlog: int = Field(description="requests waiting or running, both lanes")
    in_flight: int = Field(description="requests workers are running now")
    queues: dict[str, dict[str, int]] = Field(
        description="per lane's queue: requests waiting, reserved (running) and both together, read from the database")
    workers: WorkerCounts
    slurm: bool = Field(description="whether the profile has a [models.X.slurm] table (scales out)")
    scaling: ScalingOut | None = Field(description="null until the autoscaler has decided for this model")


class ModelList(BaseModel):
    data: list[ModelStatus]


class ErrorBody(BaseModel):
    code: str
    message: str
    param: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class Health(BaseModel):
    status: Literal["ok", "degraded", "unavailable"] = Field(
        description="degraded: the broker is down, work is still accepted and stored; unavailable: the database is down")
    checks: dict[str, str] = Field(default_factory=dict)
