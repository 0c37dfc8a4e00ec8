"""``/healthz`` (the process answers) and ``/readyz`` (which parts answer).

Ready means work can be accepted, which needs the database only: with the
broker down, submissions are stored and sent when it is back, so ``/readyz``
answers 200 ``degraded`` and names the broker; with the database down it
answers 503 ``unavailable``.
"""

from flask import Blueprint, current_app

from queue_engine.db import ping

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz():
    return {"status": "ok"}


@bp.get("/readyz")
def readyz():
    checks = {"database": _check(lambda: ping(current_app.extensions["qe_db_engine"])),
              "broker": _check(_ping_broker)}
    if checks["database"] != "ok":
        return {"status": "unavailable", "checks": checks}, 503
    return {"status": "ok" if checks["broker"] == "ok" else "degraded", "checks": checks}, 200


def _ping_broker():
    with current_app.extensions["celery"].connection_for_write() as connection:
        connection.ensure_connection(max_retries=1, timeout=2)


def _check(probe):
    try:
        probe()
    except Exception as e:
        return f"error: {type(e).__name__}: {e}"
    return "ok"
