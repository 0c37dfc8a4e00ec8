"""``/metrics``: the web process's Prometheus metrics (names in ``queue_engine.metrics``).

The queue's depth and oldest wait are read from the database at each scrape.
What the web counts: jobs submitted and the ends it makes itself (cancels,
rows of a file that failed at upload), each after its commit. In cluster
mode ``serve``'s dispatcher and webhook delivery count here too; in embedded
mode so does the worker. Workers serve their own (``queue-engine worker
--metrics-port``).
"""

from flask import Blueprint, Response, current_app

from queue_engine.metrics import (
    CONTENT_TYPE,
    JOBS_ENDED,
    JOBS_SUBMITTED,
    TRIBUNALS,
    QueueCollector,
    exposition,
    initialize,
)

bp = Blueprint("metrics", __name__)


@bp.record_once
def initialize_series(state):
    """Every series the web counts, at zero from the start (``queue_engine.metrics.initialize``)."""
    initialize(state.app.extensions["qe_settings"], "web")


@bp.get("/metrics")
def metrics():
    collector = QueueCollector(current_app.extensions["qe_sessions"], current_app.extensions["qe_settings"])
    return Response(exposition(collector), mimetype=CONTENT_TYPE)


def deployment():
    return current_app.extensions["qe_settings"].autoscaler.deployment


def count_tribunal(job, steps):
    """Count a new tribunal by how it runs, and its first steps."""
    trace = job.tribunal
    if not trace["bypassed"]:
        run = "full"
    elif trace["bypass"] == "always":
        run = "bypassed_on_request"
    else:
        run = "bypassed_under_load"
    TRIBUNALS.labels(deployment(), run).inc()
    for step in steps:
        JOBS_SUBMITTED.labels(deployment(), step.model, step.lane, "tribunal_step").inc()


def count_job(job):
    """Count a new single job."""
    JOBS_SUBMITTED.labels(deployment(), job.model, job.lane, "single").inc()


def count_batch(batch):
    """Count a new batch's rows, and those that failed at upload (they ended then)."""
    JOBS_SUBMITTED.labels(deployment(), batch.model, "bulk", "batch_item").inc(batch.total)
    if batch.failed:
        JOBS_ENDED.labels(deployment(), batch.model, "bulk", "batch_item", "failed").inc(batch.failed)


def count_cancelled(model, lane, kind, count=1):
    """Count jobs this process cancelled (after the commit)."""
    if count:
        JOBS_ENDED.labels(deployment(), model, lane, kind, "cancelled").inc(count)
