"""API keys: created once, shown once, stored as a hash."""

import base64
import hashlib
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from .errors import InvalidRequestError
from .models import ApiKey, utcnow

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


def create_api_key(session, name):
    """Store a new key called ``name`` and return it in clear, once.

    Raises:
        InvalidRequestError: the name is empty or already taken.
    """
    name = name.strip()
    if not name:
        raise InvalidRequestError("a key needs a non-empty name")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(name=name, key_hash=hash_key(key), key_prefix=key[:10], webhook_secret=new_webhook_secret())
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


@dataclass(frozen=True)
class KeyIdentity:
    """Who a request's key belongs to: what a request needs of its key row."""

    id: int
    name: str


class ApiKeyCache:
    """Key hash -> :class:`KeyIdentity` for ``ttl`` seconds, so most requests
    skip the lookup. A revoked key keeps working in a process that looked it
    up for at most ``ttl`` seconds more. Unknown keys are not kept.

    Args:
        ttl: seconds an entry is trusted; 0 looks every key up every time.
        max_entries: past this many keys, the cache starts over.
        clock: monotonic seconds (tests pass their own).
    """

    def __init__(self, ttl, max_entries=10_000, clock=time.monotonic):
        if ttl < 0:
            raise ValueError(f"ttl must be 0 or more seconds, not {ttl!r}")
        self.ttl, self.max_entries, self.clock = ttl, max_entries, clock
        self._entries = {}
        self._lock = threading.Lock()

    def find(self, get_session, key):
        """The live key's identity for ``key`` in clear, or None; ``get_session()`` is called only on a miss."""
        if not key or not key.startswith(KEY_PREFIX):
            return None
        digest = hash_key(key)
        now = self.clock()
        with self._lock:
            entry = self._entries.get(digest)
        if entry is not None and entry[0] > now:
            return entry[1]
        row = find_api_key(get_session(), key)
        identity = None if row is None else KeyIdentity(row.id, row.name)
        with self._lock:
            if identity is None or not self.ttl:
                self._entries.pop(digest, None)
            else:
                if len(self._entries) >= self.max_entries:
                    self._entries.clear()
                self._entries[digest] = (now + self.ttl, identity)
        return identity


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
