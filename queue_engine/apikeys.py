"""API keys: created once, shown once, stored as a hash."""

import base64
import hashlib
import hmac
import secrets
import threading
import time
from dataclasses import dataclass, fields
from datetime import datetime, timedelta

from sqlalchemy import case, func, select
from sqlalchemy.exc import IntegrityError

from . import batches, jobs
from .errors import BatchFinishedError, InvalidRequestError, JobFinishedError, NoSuchKeyError
from .models import ApiKey, Batch, Job, utcnow

KEY_PREFIX = "qe_"


@dataclass(frozen=True)
class NewKey:
    """What ``keys create`` shows, the only time the key is ever visible."""

    name: str
    key: str
    webhook_secret: str


def hash_key(key):
    """Keys are 256 random bits, so a plain SHA-256 is enough to store them."""
    return hashlib.sha256(key.encode()).hexdigest()


def new_webhook_secret():
    """A Standard Webhooks secret: ``whsec_`` and 24 random bytes in base64."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


def create_api_key(session, name, is_operator=False):
    """Store a new key called ``name`` and return it in clear, once. An
    ``is_operator`` key sees and may cancel every key's work.

    Raises:
        InvalidRequestError: the name is empty or already taken.
    """
    name = name.strip()
    if not name:
        raise InvalidRequestError("a key needs a non-empty name")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(name=name, key_hash=hash_key(key), key_prefix=key[:10], webhook_secret=new_webhook_secret(),
                 is_operator=is_operator)
    session.add(row)
    try:
        session.flush()
    except IntegrityError:
        raise InvalidRequestError(f"a key named {name!r} already exists; choose another name") from None
    return NewKey(name=name, key=key, webhook_secret=row.webhook_secret)


def find_api_key(session, key):
    """The live :class:`ApiKey` for ``key`` in clear, or None."""
    if not key or not key.startswith(KEY_PREFIX):
        return None
    row = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(key)))
    if row is None or row.revoked_at is not None:
        return None
    return row


def find_signed_in_key(session, key_id, key_hash):
    """The live :class:`ApiKey` a dashboard session signed in with: the row
    ``key_id`` if its stored hash is ``key_hash``, or None (unknown, revoked,
    or a session that does not hold both)."""
    if not isinstance(key_id, int) or not isinstance(key_hash, str):
        return None
    row = session.get(ApiKey, key_id, populate_existing=True)
    if row is None or row.revoked_at is not None or not hmac.compare_digest(row.key_hash, key_hash):
        return None
    return row


@dataclass(frozen=True)
class KeyIdentity:
    """Who a request's key belongs to: what a request needs of its key row,
    its quotas included, so checking them costs no lookup of the key."""

    id: int
    name: str
    is_operator: bool = False
    max_waiting_rows: int | None = None
    max_waiting_tokens: int | None = None
    requests_per_minute: int | None = None
    token_budget: int | None = None
    budget_period: str | None = None

    @classmethod
    def from_row(cls, row):
        """The identity of an :class:`ApiKey` row."""
        return cls(**{field.name: getattr(row, field.name) for field in fields(cls)})


#: Seconds between a web process's looks at whether any key changed (see :class:`ApiKeyCache`).
CHANGE_CHECK_SECONDS = 0.2


def keys_signature(session):
    """A value that changes whenever a key is created, revoked, or given other
    limits or operator rights: a few aggregates over ``api_keys``, a table of
    a few rows, so one cheap query.

    Revocations are counted as well as dated, so a revocation whose
    ``revoked_at`` is older than the newest one (clocks of two hosts) is seen.
    A change of limits is seen unless another key's limits changed by the
    opposite amount at the same moment; then it waits for the cache's TTL.
    """
    limits = [func.sum(func.coalesce(column, -1)) for column in (
        ApiKey.max_waiting_rows, ApiKey.max_waiting_tokens, ApiKey.requests_per_minute, ApiKey.token_budget)]
    return tuple(session.execute(select(
        func.count(), func.count(ApiKey.revoked_at), func.max(ApiKey.revoked_at), *limits,
        func.sum(case((ApiKey.is_operator, 1), else_=0)),
        func.sum(func.length(func.coalesce(ApiKey.budget_period, ""))),
    )).one())


class ApiKeyCache:
    """Key hash -> :class:`KeyIdentity` for ``ttl`` seconds, so most requests
    skip the lookup. Unknown keys are not kept.

    A revocation must hold at once in every web process, wherever it was
    made (``keys revoke`` in another process, or the API). So at most every
    ``check_interval`` seconds the first request to come looks at
    :func:`keys_signature` and, if it changed, the whole cache is dropped:
    a revoked key is refused within ``check_interval`` (0.2 s) by every
    process, at the cost of at most five tiny queries a second per process
    and none while idle. New limits take effect the same way. This was
    chosen over a message on the broker (Redis pub/sub) because it needs no
    broker in embedded mode, and no message can be missed: the database
    that holds the revocation is the one that is read.

    Args:
        ttl: seconds an entry is trusted; 0 looks every key up every time.
        max_entries: past this many keys, the cache starts over.
        clock: monotonic seconds (tests pass their own).
        check_interval: seconds between looks at :func:`keys_signature`.
    """

    def __init__(self, ttl, max_entries=10_000, clock=time.monotonic, check_interval=CHANGE_CHECK_SECONDS):
        if ttl < 0:
            raise ValueError(f"ttl must be 0 or more seconds, not {ttl!r}")
        self.ttl, self.max_entries, self.clock, self.check_interval = ttl, max_entries, clock, check_interval
        self._entries = {}
        self._lock = threading.Lock()
        self._checked_at = None
        self._signature = None
        #: Bumped whenever the cache is dropped: a lookup that began before must not store what it read.
        self._generation = 0

    def find(self, get_session, key):
        """The live key's identity for ``key`` in clear, or None; ``get_session()``
        is called only on a miss or when it is time to look for changed keys."""
        if not key or not key.startswith(KEY_PREFIX):
            return None
        digest = hash_key(key)
        now = self.clock()
        session = None
        if self._is_time_to_check(now):
            session = get_session()
            self._forget_if_changed(keys_signature(session))
        with self._lock:
            entry = self._entries.get(digest)
            generation = self._generation
        if entry is not None and entry[0] > now:
            return entry[1]
        row = find_api_key(session or get_session(), key)
        identity = None if row is None else KeyIdentity.from_row(row)
        with self._lock:
            if identity is None or not self.ttl:
                self._entries.pop(digest, None)
            elif generation == self._generation:
                if len(self._entries) >= self.max_entries:
                    self._entries.clear()
                self._entries[digest] = (now + self.ttl, identity)
        return identity

    def forget_all(self):
        """Drop every entry (this process just revoked or changed a key)."""
        with self._lock:
            self._entries.clear()
            self._generation += 1

    def _is_time_to_check(self, now):
        """True for one caller per ``check_interval``."""
        with self._lock:
            if self._checked_at is not None and now - self._checked_at < self.check_interval:
                return False
            self._checked_at = now
            return True

    def _forget_if_changed(self, signature):
        with self._lock:
            changed = self._signature is not None and signature != self._signature
            self._signature = signature
        if changed:
            self.forget_all()


def rotate_webhook_secret(session, name, grace_hours=24.0):
    """Give the key ``name`` a new webhook secret, and return it.

    For ``grace_hours`` the old secret signs too (``webhook-signature``
    carries both), so receivers can switch to the new one without missing
    a delivery.

    Raises:
        InvalidRequestError: no live key has this name, or the grace is negative.
    """
    if grace_hours < 0:
        raise InvalidRequestError("the grace period is hours, 0 or more")
    row = session.scalar(select(ApiKey).where(ApiKey.name == name, ApiKey.revoked_at.is_(None)))
    if row is None:
        raise InvalidRequestError(f"no key named {name!r}")
    row.previous_webhook_secret = row.webhook_secret
    row.previous_secret_until = utcnow() + timedelta(hours=grace_hours)
    row.webhook_secret = new_webhook_secret()
    session.flush()
    return row.webhook_secret, row.previous_secret_until


def get_api_key(session, name):
    """The key row called ``name``, revoked or not.

    Raises:
        NoSuchKeyError: no key has this name.
    """
    row = session.scalar(select(ApiKey).where(ApiKey.name == name))
    if row is None:
        raise NoSuchKeyError(f"no key named {name!r}")
    return row


#: The quotas ``keys set-limits`` sets; None is unlimited.
LIMITS = ("max_waiting_rows", "max_waiting_tokens", "requests_per_minute", "token_budget")
BUDGET_PERIODS = ("day", "month")


def set_key_limits(session, name, **changes):
    """Change the share and quotas of the key ``name``; only the given
    fields change, and None clears a quota (unlimited).

    Args:
        changes: ``share`` (a weight above 0), any of :data:`LIMITS` (a
            whole number, 0 or more, or None), ``budget_period`` (``day``
            or ``month``, UTC).

    Returns:
        The key row, changed.

    Raises:
        InvalidRequestError: a value out of range, or a token budget without a period.
        NoSuchKeyError: no key has this name.
    """
    row = get_api_key(session, name)
    for field, value in changes.items():
        if field == "share":
            if value is None or not value > 0:
                raise InvalidRequestError(f"share: must be a number above 0 (a weight), not {value!r}")
        elif field == "budget_period":
            if value not in (*BUDGET_PERIODS, None):
                raise InvalidRequestError(f"budget_period: must be one of {', '.join(BUDGET_PERIODS)}, not {value!r}")
        elif field in LIMITS:
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise InvalidRequestError(f"{field}: must be a whole number, 0 or more, or none, not {value!r}")
        else:
            raise InvalidRequestError(f"{field}: not a limit of a key; set share, budget_period or {', '.join(LIMITS)}")
        setattr(row, field, value)
    if row.token_budget is not None and row.budget_period is None:
        raise InvalidRequestError("token_budget: give its period too (budget_period day or month)")
    session.flush()
    return row


@dataclass(frozen=True)
class Revocation:
    """What :func:`revoke_api_key` did."""

    name: str
    revoked_at: datetime
    cancelled_jobs: int
    cancelled_batches: int


def revoke_api_key(session, name, cancel_work=False):
    """Revoke the key ``name``: from now on it authenticates nothing (every
    web process refuses it within :data:`CHANGE_CHECK_SECONDS`).

    Its work runs on unless ``cancel_work``: then its unfinished single jobs
    and tribunals, and its batches in progress, are cancelled as their owner
    would cancel them (:func:`jobs.cancel_job`, :func:`batches.cancel_batch`).
    Revoking a revoked key again keeps the first ``revoked_at``, so it can be
    used to cancel the work left behind.

    Raises:
        NoSuchKeyError: no key has this name.
    """
    row = get_api_key(session, name)
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        session.flush()
    cancelled_jobs = cancelled_batches = 0
    if cancel_work:
        unfinished = session.scalars(select(Job.id).where(
            Job.owner_id == row.id, Job.batch_id.is_(None), Job.parent_id.is_(None),
            Job.status.in_([jobs.JobState.QUEUED.value, jobs.JobState.RUNNING.value]))).all()
        cancelled_jobs = _cancel_each(unfinished, lambda job_id: jobs.cancel_job(session, row.id, job_id),
                                      JobFinishedError)
        in_progress = session.scalars(select(Batch.id).where(
            Batch.owner_id == row.id, Batch.status == batches.BatchState.IN_PROGRESS.value)).all()
        cancelled_batches = _cancel_each(
            in_progress, lambda batch_id: batches.cancel_batch(session, row.id, batch_id), BatchFinishedError)
    return Revocation(row.name, row.revoked_at, cancelled_jobs, cancelled_batches)


def _cancel_each(ids, cancel, finished_error):
    """``cancel(id)`` each of ``ids``; how many it cancelled (one that ended since it was listed is skipped)."""
    cancelled = 0
    for item_id in ids:
        try:
            cancel(item_id)
            cancelled += 1
        except finished_error:
            pass
    return cancelled
