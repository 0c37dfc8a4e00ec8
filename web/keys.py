"""``/api/v1/keys``: what an operator key may do to other keys."""

from flask import Blueprint, current_app, request

from queue_engine.apikeys import revoke_api_key
from queue_engine.errors import InvalidRequestError

from .auth import require_api_key, require_operator
from .db import get_session
from .jobs import json_body

bp = Blueprint("keys", __name__, url_prefix="/api/v1")
bp.before_request(require_api_key)
bp.before_request(require_operator)


@bp.post("/keys/<name>/revoke")
def revoke_key(name):
    """Revoke the key ``name`` at once; ``{"cancel_work": true}`` cancels its unfinished work too."""
    body = json_body() if request.get_data() else {}
    unknown = sorted(set(body) - {"cancel_work"})
    if unknown:
        raise InvalidRequestError(f"{unknown[0]}: unknown field; the body is {{\"cancel_work\": bool}}", param=unknown[0])
    cancel_work = body.get("cancel_work", False)
    if not isinstance(cancel_work, bool):
        raise InvalidRequestError(f"cancel_work: must be true or false, not {cancel_work!r}", param="cancel_work")
    session = get_session()
    revoked = revoke_api_key(session, name, cancel_work)
    session.commit()
    current_app.extensions["qe_api_keys"].forget_all()  # this process at once; the others within 0.2 s
    return {"name": revoked.name, "revoked_at": revoked.revoked_at.isoformat(),
            "cancelled_jobs": revoked.cancelled_jobs, "cancelled_batches": revoked.cancelled_batches}
