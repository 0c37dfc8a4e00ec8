"""``GET /api/v1/models``: each model profile's backlog, workers and scaling
(operator keys only: it shows the whole service's load)."""

from flask import Blueprint, current_app

from queue_engine import allocations, load

from .auth import require_api_key, require_operator
from .db import get_session

bp = Blueprint("models", __name__, url_prefix="/api/v1")
bp.before_request(require_api_key)
bp.before_request(require_operator)


@bp.get("/models")
def list_models():
    settings = current_app.extensions["qe_settings"]
    session = get_session()
    return allocations.models_status(session, settings, load.read_backlog(session, list(settings.models)))
