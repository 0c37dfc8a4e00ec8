"""Bearer-key authentication for ``/api`` and ``/v1``, the key's rate limit,
and the operator-only check."""

from flask import current_app, g, request

from queue_engine.apikeys import ApiKeyCache
from queue_engine.errors import AuthenticationError, OperatorOnlyError
from queue_engine.ratelimit import open_rate_limiter

from .db import get_session


def require_api_key():
    """``before_request`` hook: sets ``g.api_key`` (a
    :class:`~queue_engine.apikeys.KeyIdentity`) or answers 401; counts the
    request against the key's ``requests_per_minute`` (429 ``rate_limited`` above it)."""
    scheme, _, key = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise AuthenticationError("send your API key as 'Authorization: Bearer <key>'")
    api_key = current_app.extensions["qe_api_keys"].find(get_session, key.strip())
    if api_key is None:
        raise AuthenticationError("this API key is not valid (unknown or revoked)")
    g.api_key = api_key
    current_app.extensions["qe_rate_limiter"].check(api_key)


def require_operator():
    """``before_request`` hook after :func:`require_api_key`: 403 unless the key is an operator's."""
    if not g.api_key.is_operator:
        raise OperatorOnlyError(
            f"{request.path} is for operator keys only; key {g.api_key.name!r} is not one "
            "(an operator creates one with 'queue-engine keys create NAME --operator')")


def init_app(app):
    settings = app.extensions["qe_settings"]
    app.extensions["qe_api_keys"] = ApiKeyCache(settings.api_key_cache_seconds)
    app.extensions["qe_rate_limiter"] = open_rate_limiter(settings)
