"""The errors the domain raises; ``web/errors.py`` maps them to HTTP answers."""


class QueueEngineError(Exception):
    """Base class of every error queue-engine raises on purpose."""

    code = "error"


class InvalidRequestError(QueueEngineError):
    """The caller sent something we cannot accept; the message says what."""

    code = "invalid_request"

    def __init__(self, message, code=None):
        super().__init__(message)
        if code:
            self.code = code


class AuthenticationError(QueueEngineError):
    """No API key, or one that is unknown or revoked."""

    code = "unauthorized"


class NoSuchJobError(QueueEngineError):
    """No job with this id is visible to this key."""

    code = "not_found"


class JobFinishedError(QueueEngineError):
    """The job already ended, so it cannot be cancelled."""

    code = "job_finished"


class IdempotencyConflictError(QueueEngineError):
    """An ``Idempotency-Key`` was reused with a different request body."""

    code = "idempotency_conflict"


class InvalidTransitionError(QueueEngineError):
    """A job state change that the life-cycle table does not allow."""

    code = "invalid_transition"


class SettingsError(QueueEngineError):
    """The configuration (TOML file or environment) is wrong."""

    code = "bad_settings"


class BrokerUnavailableError(QueueEngineError):
    """The message broker could not take the job; nothing was stored."""

    code = "broker_unavailable"


class EngineRejectedError(QueueEngineError):
    """The inference engine refused the request itself (e.g. prompt too long).

    Retrying cannot help, so the job fails at once.
    """

    code = "engine_rejected"
