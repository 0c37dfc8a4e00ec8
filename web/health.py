"""``/healthz`` (the process answers) and ``/readyz`` (database and broker answer)."""

from flask import Blueprint, current_app

from queue_engine.db import ping

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz():
    return {"status": "ok"}


@bp.get("/readyz")
def readyz():
    checks = {"database": _check(lambda: ping(current_app.extensions["qe_db_engine"]))}
    checks["broker"] = _check(_ping_broker)
    ready = all(value == "ok" for value in checks.values())
    return {"status": "ok" if ready else "unavailable", "checks": checks}, 200 if ready else 503


def _ping_broker():
    with current_app.extensions["celery"].connection_for_write() as connection:
        connection.ensure_connection(max_retries=1, timeout=2)


def _check(probe):
    try:
        probe()
    except Exception as e:
        return f"error: {type(e).__name__}: {e}"
    return "ok"
