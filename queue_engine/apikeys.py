"""API keys: created once, shown once, stored as a hash."""

import base64
import hashlib
import secrets
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from .errors import InvalidRequestError
from .models import ApiKey

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
