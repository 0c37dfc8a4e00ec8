"""Running the web service: waitress in front of the Flask app in one
process (embedded mode, or a small cluster deployment), or gunicorn with
several processes (cluster mode in production); in embedded mode an
in-process worker runs beside it."""

import os
import signal
import subprocess
import sys
from pathlib import Path

from sqlalchemy import func, select
from waitress.server import create_server

from queue_engine.apikeys import create_api_key
from queue_engine.db import make_sessions, transaction
from queue_engine.models import ApiKey

#: Seconds gunicorn gives its workers to finish their requests on a stop:
#: a long-poll (``?wait=``) may hold a request for ``max_wait``.
GRACEFUL_SECONDS = 10
#: The app factory gunicorn's workers call, each after it forks; it reads
#: the settings from the same environment as ``serve``.
APP_FACTORY = "web:create_app()"


def embedded_key_path(settings):
    return Path(settings.data_dir) / "embedded-api-key"


def embedded_secret_path(settings):
    return Path(settings.data_dir) / "embedded-webhook-secret"


def ensure_embedded_key(settings):
    """On the first start of an empty database, create a key called
    ``embedded`` and keep it, and its webhook secret, for the owner. It is
    an operator key: whoever runs the embedded service owns the install.

    Returns:
        The :class:`~queue_engine.apikeys.NewKey` if this call created it, else None.
    """
    sessions = make_sessions(settings.sqlalchemy_url)
    with transaction(sessions) as session:
        if session.scalar(select(func.count()).select_from(ApiKey)):
            return None
        new_key = create_api_key(session, "embedded", is_operator=True)
    for path, value in ((embedded_key_path(settings), new_key.key),
                        (embedded_secret_path(settings), new_key.webhook_secret)):
        path.write_text(value + "\n")
        os.chmod(path, 0o600)
    return new_key


def build_server(app, host="127.0.0.1", port=8000):
    """A waitress server for the Flask ``app``; call ``.run()`` on it to serve."""
    threads = app.extensions["qe_settings"].web_threads
    # channel_request_lookahead: a client that goes away while its request runs is seen
    # (waitress.client_disconnected), so a /v1 request it left can be cancelled.
    # connection_limit: waitress's default of 100 counts idle keep-alive connections
    # too, so the 101st client waited for one to time out (120 s); as gunicorn's below.
    return create_server(app, host=host, port=port, threads=threads, channel_request_lookahead=1,
                         connection_limit=max(1000, 2 * threads))


def gunicorn_command(settings, host, port, workers):
    """The command line of a gunicorn serving the app with ``workers``
    processes of ``settings.web_threads`` threads each (gthread workers: a
    thread waiting in a long-poll holds no process)."""
    return [
        sys.executable, "-m", "gunicorn", "--worker-class", "gthread", "--workers", str(workers),
        "--threads", str(settings.web_threads), "--bind", f"{host}:{port}",
        "--graceful-timeout", str(GRACEFUL_SECONDS), "--timeout", str(int(settings.max_wait) + 30),
        "--worker-connections", str(max(1000, 2 * settings.web_threads)),
        "--log-level", "warning", "--no-control-socket", APP_FACTORY,
    ]


def run_gunicorn(settings, host, port, workers):
    """Run gunicorn as a child process until it exits; SIGTERM, SIGINT and
    SIGHUP are passed on to it (a stop is graceful).

    It runs as a child rather than in this process so that its master forks
    workers from a process without threads: ``serve``'s dispatcher and
    webhook delivery run here, once, not in every worker.

    Returns:
        gunicorn's exit status.
    """
    process = subprocess.Popen(gunicorn_command(settings, host, port, workers))
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, lambda number, frame: process.send_signal(number))
    return process.wait()
