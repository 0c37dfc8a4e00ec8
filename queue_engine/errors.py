"""The errors the domain raises; ``web/errors.py`` maps them to HTTP answers."""


class QueueEngineError(Exception):
    """Base class of every error queue-engine raises on purpose."""

    code = "error"


class InvalidRequestError(QueueEngineError):
    """The caller sent something we cannot accept; the message says what."""

    code = "invalid_request"
    #: The field at fault, where one is known (answered as ``error.param``).
    param = None

    def __init__(self, message, code=None, param=None):
        super().__init__(message)
        if code:
            self.code = code
        if param:
            self.param = param


class InvalidJsonError(InvalidRequestError):
    """JSON text that cannot be read, or that holds a value no field may hold.

    ``problem`` says what is wrong and ``param`` where (``messages.0.content``),
    so a caller reading a file can report both beside the line number.
    """

    code = "invalid_json"

    def __init__(self, problem, param=None, code=None):
        super().__init__(f"{param}: {problem}" if param else problem, code, param)
        self.problem = problem


class AuthenticationError(QueueEngineError):
    """No API key, or one that is unknown or revoked."""

    code = "unauthorized"


class NotFoundError(QueueEngineError):
    """Nothing with this id is visible to this key (another key's is the same)."""

    code = "not_found"


class NoSuchJobError(NotFoundError):
    """No job with this id is visible to this key."""


class NoSuchBatchError(NotFoundError):
    """No batch with this id is visible to this key."""


class JobFinishedError(QueueEngineError):
    """The job already ended, so it cannot be cancelled."""

    code = "job_finished"


class BatchFinishedError(QueueEngineError):
    """The batch already ended, so it cannot be cancelled."""

    code = "batch_finished"


class JobFailedError(QueueEngineError):
    """A request waited on ended in failure (``code``: the job's error code)."""

    def __init__(self, message, code):
        super().__init__(message)
        self.code = code


class NoWorkerError(QueueEngineError):
    """No worker started a request in time (``openai.queue_timeout_seconds``);
    it was cancelled. ``retry_after``: seconds after which to try again."""

    code = "no_worker_available"

    def __init__(self, message, retry_after):
        super().__init__(message)
        self.retry_after = retry_after


class QuotaExceededError(QueueEngineError):
    """A key's quota refuses this request; nothing of it was stored.

    ``code`` says which quota: ``quota_exceeded`` (work waiting at once),
    ``rate_limited`` (requests per minute), ``token_budget_exhausted``.
    ``retry_after``: seconds after which trying again can succeed, where
    that is known (the end of the rate window or of the budget period).
    """

    code = "quota_exceeded"

    def __init__(self, message, retry_after=None):
        super().__init__(message)
        self.retry_after = retry_after


class RateLimitedError(QuotaExceededError):
    """The key sent more API requests this minute than its ``requests_per_minute``."""

    code = "rate_limited"


class TokenBudgetExhaustedError(QuotaExceededError):
    """The key has used its ``token_budget`` for this day or month; running work finishes."""

    code = "token_budget_exhausted"


class OperatorOnlyError(QueueEngineError):
    """Only an operator key may do this (``keys create --operator``)."""

    code = "operator_only"


class NoSuchKeyError(NotFoundError):
    """No API key has this name."""


class InvalidFileError(InvalidRequestError):
    """An uploaded file cannot be read as a batch; nothing of it is kept.

    The message names the line (and column) so the user can fix the file.
    """

    code = "invalid_file"

    def __init__(self, message, line=None, column=None):
        where = f"line {line}" if line is not None else ""
        if column is not None:
            where += f"{', ' if where else ''}column {column!r}"
        super().__init__(f"{where}: {message}" if where else message, param="file")
        self.problem, self.line, self.column = message, line, column


class IdempotencyConflictError(QueueEngineError):
    """An ``Idempotency-Key`` was reused with a different request body."""

    code = "idempotency_conflict"


class InvalidTransitionError(QueueEngineError):
    """A state change (of a job, batch, chunk, allocation or webhook event) that its ``ALLOWED`` table does not allow."""

    code = "invalid_transition"


class SettingsError(QueueEngineError):
    """The configuration (TOML file or environment) is wrong."""

    code = "bad_settings"


class EngineRejectedError(QueueEngineError):
    """The inference engine refused the request itself (e.g. prompt too long).

    Retrying cannot help, so the job fails at once.
    """

    code = "engine_rejected"
