"""Bearer-key authentication for ``/api`` and ``/v1``."""

from flask import current_app, g, request

from queue_engine.apikeys import ApiKeyCache
from queue_engine.errors import AuthenticationError

from .db import get_session


def require_api_key():
    """``before_request`` hook: sets ``g.api_key`` (a
    :class:`~queue_engine.apikeys.KeyIdentity`) or answers 401."""
    scheme, _, key = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise AuthenticationError("send your API key as 'Authorization: Bearer <key>'")
    api_key = current_app.extensions["qe_api_keys"].find(get_session, key.strip())
    if api_key is None:
        raise AuthenticationError("this API key is not valid (unknown or revoked)")
    g.api_key = api_key


def init_app(app):
    app.extensions["qe_api_keys"] = ApiKeyCache(app.extensions["qe_settings"].api_key_cache_seconds)
