"""API keys: created once, shown once, stored as a hash."""

import base64
import hashlib
import secrets
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
