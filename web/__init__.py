"""The Flask web service: the public HTTP API in front of the database and the
queues, and the dashboard (HTML pages for people, signed in with an API key)."""

from flask import Flask
from werkzeug.routing import BaseConverter

from queue_engine.broker import Sender, make_celery
from queue_engine.db import make_engine, make_session_factory
from queue_engine.settings import load_settings

from . import auth, batches, dashboard, dashboard_auth, db, errors, health, jobs, keys, metrics, models, openapi, tribunals, usage, v1_batches, v1_completions, v1_files, v1_models, webhooks


class SegmentConverter(BaseConverter):
    """An id in a path: one segment without NUL (``%00``), which no database
    text can hold; such a path matches no route and is a JSON 404."""

    regex = "[^/\\x00]+"


def create_app(settings=None, celery_app=None):
    """Build the web app.

    Args:
        settings: the :class:`~queue_engine.settings.Settings`; read from the
            environment when omitted.
        celery_app: the Celery app to enqueue on; built from ``settings``
            when omitted (embedded mode passes the one its worker uses).
    """
    settings = settings or load_settings()
    app = Flask(__name__)
    # Before any route is added: "//" is a 404 like any unknown path, not a
    # redirect (an HTML page), and ids are SegmentConverter's.
    app.url_map.merge_slashes = False
    app.url_map.converters["default"] = SegmentConverter
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.json.sort_keys = False
    engine = make_engine(settings.sqlalchemy_url)
    app.extensions["qe_settings"] = settings
    app.extensions["qe_db_engine"] = engine
    app.extensions["qe_sessions"] = make_session_factory(engine)
    app.extensions["celery"] = celery_app or make_celery(settings)
    app.extensions["qe_sender"] = Sender(app.extensions["celery"], app.extensions["qe_sessions"], settings)
    db.init_app(app)
    auth.init_app(app)
    errors.init_app(app)
    app.register_blueprint(health.bp)
    app.register_blueprint(jobs.bp)
    app.register_blueprint(tribunals.bp)
    app.register_blueprint(batches.bp)
    app.register_blueprint(webhooks.bp)
    app.register_blueprint(models.bp)
    app.register_blueprint(keys.bp)
    app.register_blueprint(usage.bp)
    app.register_blueprint(metrics.bp)
    app.register_blueprint(openapi.bp)
    app.register_blueprint(v1_files.bp)
    app.register_blueprint(v1_batches.bp)
    app.register_blueprint(v1_models.bp)
    app.register_blueprint(v1_completions.bp)
    dashboard_auth.init_app(app)
    dashboard.init_app(app)
    return app
