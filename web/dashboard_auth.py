"""The dashboard's sign-in: an API key typed once, then a signed session cookie.

The cookie holds the key's id and its stored SHA-256, never the key itself,
and is HttpOnly, SameSite=Lax and (``secure_cookies``) Secure. Every request
looks the key up again (:func:`~queue_engine.apikeys.find_signed_in_key`),
so a revoked key is signed out on its next page. The forms that act (sign
in, sign out, cancel) carry a CSRF token (flask-wtf's ``generate_csrf`` and
``validate_csrf``; not its global ``CSRFProtect``, which would also ask the
bearer-key API for one). Dashboard pages are sent with a strict
Content-Security-Policy: nothing but this server's own files, no inline
script or style.
"""

import os
import secrets
import time
from datetime import timedelta
from pathlib import Path

from flask import Blueprint, current_app, flash, g, redirect, render_template, request, session, url_for
from flask_wtf.csrf import generate_csrf, validate_csrf
from wtforms.validators import ValidationError

from queue_engine.apikeys import KeyIdentity, find_api_key, find_signed_in_key
from queue_engine.errors import InvalidRequestError, QueueEngineError

from .db import get_session
from .errors import STATUS_FOR

bp = Blueprint("dashboard_auth", __name__, url_prefix="/dashboard")

#: How long a sign-in lasts, however much it is used.
SESSION_HOURS = 12

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    # Pages show a key's work: no shared cache keeps them, no back button replays them signed out.
    "Cache-Control": "no-store",
}


class CsrfError(InvalidRequestError):
    """A dashboard form came without a valid CSRF token."""

    code = "csrf_failed"


def load_secret_key(settings):
    """``settings.secret_key``, or the random key kept in ``data_dir/secret_key``
    (mode 0600), made on first use. It is made whole under a temporary name
    and linked into place, so web processes starting together all read the
    same complete key."""
    if settings.secret_key:
        return settings.secret_key
    path = Path(settings.data_dir) / "secret_key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".secret_key.{secrets.token_hex(8)}")
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as file:
            file.write(secrets.token_urlsafe(48) + "\n")
        try:
            os.link(temporary, path)
        except FileExistsError:
            pass  # another process made it first; use theirs
        finally:
            os.unlink(temporary)
    return path.read_text().strip()


def current_viewer():
    """The signed-in key's :class:`~queue_engine.apikeys.KeyIdentity`, or None;
    a session whose key was revoked (or removed), or that is older than
    :data:`SESSION_HOURS`, is cleared."""
    if "viewer" not in g:
        row = None
        if "key_id" in session:
            if time.time() - session.get("signed_in_at", 0) > SESSION_HOURS * 3600:
                session.clear()
                flash(f"Your sign-in is over {SESSION_HOURS} hours old; sign in again.")
            else:
                row = find_signed_in_key(get_session(), session.get("key_id"), session.get("key_hash"))
                if row is None:
                    session.clear()
                    flash("Your key is no longer valid (revoked?); sign in again.")
        g.viewer = None if row is None else KeyIdentity.from_row(row)
    return g.viewer


def require_viewer():
    """``before_request`` hook of dashboard pages: to the sign-in page unless
    signed in. The signed-in key is also ``g.api_key``, the key the web's
    shared actions (``queueing.cancel_job``...) act for."""
    viewer = current_viewer()
    if viewer is None:
        return redirect(url_for("dashboard_auth.sign_in"))
    g.api_key = viewer
    return None


def check_csrf():
    """Refuse a form without this session's CSRF token (a 400).

    Raises:
        CsrfError: the token is missing, expired, or not this session's.
    """
    try:
        validate_csrf(request.form.get("csrf_token"))
    except ValidationError as e:
        hint = "Reload the page and try again."
        if "csrf_token" not in session and not request.is_secure and current_app.config["SESSION_COOKIE_SECURE"]:
            # The browser dropped the Secure cookie: plain HTTP to a host other than localhost.
            hint = ("The browser did not keep the session cookie, which is sent over HTTPS only: use HTTPS, "
                    "or set secure_cookies = false (QUEUE_ENGINE_SECURE_COOKIES=false) on a trusted network.")
        raise CsrfError(f"{e} {hint}") from None


def add_security_headers(response):
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    return response


def render_error(error):
    """A domain error on a dashboard page, as a page (the API answers JSON)."""
    status = next((s for cls, s in STATUS_FOR.items() if isinstance(error, cls)), 400)
    return render_template("error.html", status=status, message=str(error)), status


bp.after_request(add_security_headers)
bp.register_error_handler(QueueEngineError, render_error)


@bp.get("/sign-in")
def sign_in():
    if current_viewer() is not None:
        return redirect(url_for("dashboard.show_overview"))
    return render_template("sign_in.html")


@bp.post("/sign-in")
def sign_in_with_key():
    check_csrf()
    row = find_api_key(get_session(), request.form.get("key", "").strip())
    if row is None:
        return render_template("sign_in.html", error="This API key is not valid (unknown or revoked)."), 401
    session.clear()  # a new session: nothing of the one before sign-in carries over
    session.permanent = True
    session.update(key_id=row.id, key_hash=row.key_hash, signed_in_at=int(time.time()))
    return redirect(url_for("dashboard.show_overview"))


@bp.post("/sign-out")
def sign_out():
    check_csrf()
    session.clear()
    flash("Signed out.")
    return redirect(url_for(".sign_in"))


def init_app(app):
    """The session cookie's settings, the secret key, CSRF tokens in templates, and the blueprint."""
    settings = app.extensions["qe_settings"]
    app.secret_key = load_secret_key(settings)
    app.config.update(
        SESSION_COOKIE_NAME="qe_session",
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_SECURE=settings.secure_cookies,
        PERMANENT_SESSION_LIFETIME=timedelta(hours=SESSION_HOURS),
    )
    app.jinja_env.globals["csrf_token"] = generate_csrf
    app.register_blueprint(bp)
