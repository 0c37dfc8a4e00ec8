"""Running the web service: waitress in front of the Flask app, and in
embedded mode an in-process worker beside it."""

import os
from pathlib import Path

from sqlalchemy import func, select
from waitress.server import create_server

from queue_engine.apikeys import create_api_key
from queue_engine.db import make_sessions, transaction
from queue_engine.models import ApiKey

#: Threads waitress serves requests with.
WEB_THREADS = 16


def embedded_key_path(settings):
    return Path(settings.data_dir) / "embedded-api-key"


def embedded_secret_path(settings):
    return Path(settings.data_dir) / "embedded-webhook-secret"


def ensure_embedded_key(settings):
    """On the first start of an empty database, create a key called
    ``embedded`` and keep it, and its webhook secret, for the owner.

    Returns:
        The :class:`~queue_engine.apikeys.NewKey` if this call created it, else None.
    """
    sessions = make_sessions(settings.sqlalchemy_url)
    with transaction(sessions) as session:
        if session.scalar(select(func.count()).select_from(ApiKey)):
            return None
        new_key = create_api_key(session, "embedded")
    for path, value in ((embedded_key_path(settings), new_key.key),
                        (embedded_secret_path(settings), new_key.webhook_secret)):
        path.write_text(value + "\n")
        os.chmod(path, 0o600)
    return new_key


def build_server(app, host="127.0.0.1", port=8000):
    """A waitress server for the Flask ``app``; call ``.run()`` on it to serve."""
    return create_server(app, host=host, port=port, threads=WEB_THREADS)
