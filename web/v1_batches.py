"""``/v1/batches``: OpenAI's Batch API over the native batches
(``queue_engine.openai_batches``), so the official ``openai`` client runs
batch scripts unchanged."""

from flask import Blueprint, current_app, g

from queue_engine import batches, openai_batches, quotas

from . import metrics, queueing
from .auth import require_api_key
from .db import get_session
from .jobs import json_body, query_int, query_text

bp = Blueprint("v1_batches", __name__, url_prefix="/v1")
bp.before_request(require_api_key)


@bp.post("/batches")
def create_batch():
    """200 with the batch, ``failed`` with ``errors`` if its file has a problem."""
    body = json_body()
    settings = current_app.extensions["qe_settings"]
    openai_batches.check_request(settings, body)
    session = get_session()
    quotas.check_budget(session, g.api_key)
    batch = openai_batches.create(session, g.api_key.id, settings, body, admit=admit_batch)
    session.commit()
    metrics.count_batch(batch)
    return openai_batches.batch_to_dict(session, batch)


def admit_batch(session, batch):
    """Refuse a batch that takes the key over what it may have waiting (``queue_engine.quotas``)."""
    quotas.check_waiting(session, g.api_key, quotas.batch_waiting(batch), stored=True)


@bp.get("/batches")
def list_batches():
    session = get_session()
    page, has_more = openai_batches.list_batches(
        session, g.api_key.id, after=query_text("after"), limit=query_int("limit", 20))
    return openai_batches.batch_list_to_dict(session, page, has_more)


@bp.get("/batches/<batch_id>")
def get_batch(batch_id):
    session = get_session()
    batch = batches.get_batch(session, g.api_key.id, batch_id, g.api_key.is_operator)
    return openai_batches.batch_to_dict(session, batch)


@bp.post("/batches/<batch_id>/cancel")
def cancel_batch(batch_id):
    batch = queueing.cancel_batch(batch_id)
    return openai_batches.batch_to_dict(get_session(), batch)
