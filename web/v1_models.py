"""``GET /v1/models``: the configured model profiles in OpenAI's list shape,
so ``client.models.list()`` and ``client.models.retrieve(id)`` work unchanged."""

import time

from flask import Blueprint, current_app

from queue_engine.errors import NotFoundError

from .auth import require_api_key

bp = Blueprint("v1_models", __name__, url_prefix="/v1")
bp.before_request(require_api_key)

#: Profiles come from the settings, read when the process starts: that is when they were "created".
OWNER = "queue-engine"


def model_object(name, created):
    return {"id": name, "object": "model", "created": created, "owned_by": OWNER}


def _created():
    return current_app.extensions.setdefault("qe_v1_models_created", int(time.time()))


@bp.get("/models")
def list_models():
    created = _created()
    names = sorted(current_app.extensions["qe_settings"].models)
    return {"object": "list", "data": [model_object(name, created) for name in names]}


@bp.get("/models/<model_id>")
def get_model(model_id):
    if model_id not in current_app.extensions["qe_settings"].models:
        raise NotFoundError(f"no model {model_id!r}; GET /v1/models lists them")
    return model_object(model_id, _created())
