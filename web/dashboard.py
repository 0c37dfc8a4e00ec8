"""The dashboard: HTML pages of the models' load, a key's batches and jobs,
one batch, one job; a batch's results and cancelling, through the sign-in
session (``dashboard_auth``). An ordinary key sees its own work only (another
key's page is a 404); an operator key sees every key's.

Pages are rendered whole on the server, so they read the same without
JavaScript; ``static/dashboard.js`` only fetches the page again every few
seconds and swaps its ``<main>``.
"""

from flask import Blueprint, current_app, flash, redirect, render_template, url_for

from queue_engine import batches, overview
from queue_engine.errors import BatchFinishedError, JobFinishedError, QueueEngineError

from . import dashboard_format, queueing
from .batches import results_format, results_response
from .dashboard_auth import add_security_headers, check_csrf, current_viewer, render_error, require_viewer
from .db import get_session

bp = Blueprint("dashboard", __name__)
bp.before_request(require_viewer)
bp.after_request(add_security_headers)
bp.register_error_handler(QueueEngineError, render_error)

#: Seconds between a live page's refreshes.
REFRESH_SECONDS = 2


@bp.get("/")
def index():
    return redirect(url_for(".show_overview"))


@bp.get("/dashboard")
def show_overview():
    viewer, session = current_viewer(), get_session()
    settings = current_app.extensions["qe_settings"]
    return render_template(
        "overview.html", models=overview.models_overview(session, settings, viewer),
        batches=overview.recent_batches(session, viewer), jobs=overview.recent_jobs(session, viewer),
        latency=overview.latency, refresh=REFRESH_SECONDS, chart_minutes=overview.CHART_MINUTES,
        recent=overview.RECENT)


@bp.get("/dashboard/batches/<batch_id>")
def show_batch(batch_id):
    page = overview.batch_page(get_session(), current_viewer(), batch_id)
    return render_template("batch.html", **page, refresh=REFRESH_SECONDS if page["is_active"] else None)


@bp.get("/dashboard/batches/<batch_id>/results")
def batch_results(batch_id):
    """The results file, as ``GET /api/v1/batches/{id}/results`` streams it."""
    viewer, file_format = current_viewer(), results_format()
    batch = batches.get_batch(get_session(), viewer.id, batch_id, viewer.is_operator)
    return results_response(batch, file_format)


@bp.post("/dashboard/batches/<batch_id>/cancel")
def cancel_batch(batch_id):
    """Cancel as ``POST /api/v1/batches/{id}/cancel`` does (and counted the same way)."""
    check_csrf()
    try:
        queueing.cancel_batch(batch_id)
        flash("Batch cancelled: its queued rows will not run; running rows finish.")
    except BatchFinishedError as e:
        flash(str(e))
    return redirect(url_for(".show_batch", batch_id=batch_id))


@bp.get("/dashboard/jobs/<job_id>")
def show_job(job_id):
    page = overview.job_page(get_session(), current_viewer(), job_id)
    return render_template("job.html", **page, refresh=REFRESH_SECONDS if page["is_active"] else None)


@bp.post("/dashboard/jobs/<job_id>/cancel")
def cancel_job(job_id):
    """Cancel as ``POST /api/v1/jobs/{id}/cancel`` does (and counted the same way)."""
    check_csrf()
    try:
        queueing.cancel_job(job_id)
        flash("Job cancelled.")
    except JobFinishedError as e:
        flash(str(e))
    return redirect(url_for(".show_job", job_id=job_id))


def init_app(app):
    dashboard_format.init_app(app)
    app.context_processor(lambda: {"viewer": current_viewer()})
    app.register_blueprint(bp)
