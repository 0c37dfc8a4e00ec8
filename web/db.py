"""One database session per request, closed when the request ends."""

from flask import current_app, g


def get_session():
    if "db_session" not in g:
        g.db_session = current_app.extensions["qe_sessions"]()
    return g.db_session


def close_session(exception=None):
    session = g.pop("db_session", None)
    if session is not None:
        session.close()


def init_app(app):
    app.teardown_appcontext(close_session)
