"""``/api/v1/usage``: what a key used, per key, model or day; an operator's key sees every key's."""

from flask import Blueprint, g

from queue_engine import usage
from queue_engine.errors import InvalidRequestError, OperatorOnlyError
from queue_engine.models import utcnow

from .auth import require_api_key
from .db import get_session
from .jobs import query_text

bp = Blueprint("usage", __name__, url_prefix="/api/v1")
bp.before_request(require_api_key)


def usage_owner():
    """The key whose usage to read: the caller's; None (every key) for an operator asking ``all=true``."""
    every = query_text("all") or "false"
    if every not in ("true", "false"):
        raise InvalidRequestError(f"all: {every!r} is not true or false", param="all")
    if every == "false":
        return g.api_key.id
    if not g.api_key.is_operator:
        raise OperatorOnlyError(f"all=true is for operator keys only; key {g.api_key.name!r} reads its own "
                                "usage (leave all out)")
    return None


@bp.get("/usage")
def get_usage():
    """Usage from ``from`` to ``to`` (default: this month so far, UTC), grouped by ``group_by`` (default model)."""
    date_from, date_to = usage.period(query_text("from"), query_text("to"), utcnow().date())
    group_by = usage.check_group_by(query_text("group_by") or "model")
    rows = usage.read_usage(get_session(), usage_owner(), date_from, date_to, group_by)
    return usage.usage_to_dict(rows, date_from, date_to, group_by)
