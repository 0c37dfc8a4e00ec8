"""``/metrics``: the web process's Prometheus metrics.

Workers serve their own (``queue-engine worker --metrics-port``); in embedded
mode the worker's metrics are in this process and are served here too.
"""

from flask import Blueprint, Response
from prometheus_client import CONTENT_TYPE_LATEST, Counter, generate_latest

bp = Blueprint("metrics", __name__)

TRIBUNALS = Counter(
    "qe_tribunals_total",
    "Tribunals submitted, by how they run: full, or bypassed (a single pass) under load or on request",
    ["run"],
)


def count_tribunal(job):
    """Count a new tribunal by how it runs."""
    trace = job.tribunal
    if not trace["bypassed"]:
        run = "full"
    elif trace["bypass"] == "always":
        run = "bypassed_on_request"
    else:
        run = "bypassed_under_load"
    TRIBUNALS.labels(run=run).inc()


@bp.get("/metrics")
def metrics():
    return Response(generate_latest(), mimetype=CONTENT_TYPE_LATEST)
