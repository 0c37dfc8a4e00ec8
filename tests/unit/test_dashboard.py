"""The dashboard over Flask's test client: sign-in and its cookie, CSRF on
the forms that act (sign-in, sign-out, cancel), security headers. Who sees
what, and what the pages hold, is in ``test_dashboard_pages.py``; the same
pages in a real browser, with a real worker, in
``tests/integration/test_dashboard_browser.py``."""

import io
import os
import re
from types import SimpleNamespace

import pytest

from queue_engine import apikeys
from queue_engine.db import transaction
from queue_engine.models import ApiKey
from tests.conftest import make_key
from web.dashboard_auth import load_secret_key

CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


# --- helpers ---------------------------------------------------------------------


def csrf_of(response):
    return CSRF.search(response.get_data(as_text=True)).group(1)


def new_key(app, name, operator=False):
    """A new key of ``app``: ``(key in clear, owner id)``."""
    key, owner_id = make_key(app.extensions["qe_sessions"], name)
    if operator:
        with transaction(app.extensions["qe_sessions"]) as session:
            session.get(ApiKey, owner_id).is_operator = True
    return key.key, owner_id


def sign_in(client, key):
    token = csrf_of(client.get("/dashboard/sign-in"))
    return client.post("/dashboard/sign-in", data={"key": key, "csrf_token": token})


def signed_in(app, name="alice", operator=False):
    """A test client signed in with a new key: ``(client, key, owner id)``."""
    client = app.test_client()
    key, owner_id = new_key(app, name, operator)
    assert sign_in(client, key).status_code == 302
    return client, key, owner_id


def bearer(key):
    return {"Authorization": f"Bearer {key}"}


def submit_job(client, key, prompt="Say hello"):
    response = client.post("/api/v1/jobs", json={"model": "tiny", "prompt": prompt}, headers=bearer(key))
    assert response.status_code == 202, response.get_json()
    return response.get_json()["id"]


def submit_batch(client, key, rows=3):
    text = "id,prompt\n" + "".join(f"r{i},Question {i}\n" for i in range(rows))
    form = {"model": "tiny", "file": (io.BytesIO(text.encode()), "questions.csv")}
    response = client.post("/api/v1/batches", data=form, headers=bearer(key), content_type="multipart/form-data")
    assert response.status_code == 202, response.get_json()
    return response.get_json()["id"]


def submit_tribunal(client, key):
    body = {"prompt": "What is a list?", "candidates": ["tiny", "tiny"], "judge": "tiny", "bypass": "never"}
    response = client.post("/api/v1/tribunals", json=body, headers=bearer(key))
    assert response.status_code == 202, response.get_json()
    return response.get_json()["id"]


def page(client, path, status=200):
    response = client.get(path)
    assert response.status_code == status, response.get_data(as_text=True)[:500]
    return response.get_data(as_text=True)


def cookie_header(response):
    return next(value for name, value in response.headers.items()
                if name == "Set-Cookie" and value.startswith("qe_session="))


# --- sign-in, sign-out and the session cookie ------------------------------------


def test_root_and_dashboard_lead_to_the_sign_in_page(client):
    """``/`` goes to ``/dashboard``, which goes to the sign-in form until one signs in."""
    assert client.get("/").headers["Location"] == "/dashboard/sign-in"
    assert client.get("/dashboard").headers["Location"] == "/dashboard/sign-in"
    assert client.get("/dashboard/jobs/job_x").headers["Location"] == "/dashboard/sign-in"
    assert 'name="key"' in page(client, "/dashboard/sign-in")


def test_sign_in_with_a_key_shows_its_name_and_root_serves_the_overview(app):
    """After sign-in the overview names the key; ``/`` leads there."""
    client, _, _ = signed_in(app, "alice")
    assert client.get("/").headers["Location"] == "/dashboard"
    html = page(client, "/dashboard")
    assert "signed in as <strong>alice</strong>" in html and 'id="models"' in html


def test_the_session_cookie_is_http_only_lax_secure_and_holds_no_key(app):
    """HttpOnly, SameSite=Lax, Secure; it holds the key's id and stored hash, never the key."""
    client = app.test_client()
    key, owner_id = new_key(app, "alice")
    response = sign_in(client, key)
    header = cookie_header(response)
    assert "HttpOnly" in header and "SameSite=Lax" in header and "Secure" in header and "Expires=" in header
    value = header.split(";")[0].split("=", 1)[1]
    contents = app.session_interface.get_signing_serializer(app).loads(value)
    assert contents["key_id"] == owner_id and contents["key_hash"] == apikeys.hash_key(key)
    assert key not in str(contents) and key not in header


def test_secure_cookies_false_drops_the_secure_flag(make_app):
    """``secure_cookies = false`` lets a browser sign in over plain HTTP."""
    app = make_app(secure_cookies=False)
    key, _ = new_key(app, "alice")
    header = cookie_header(sign_in(app.test_client(), key))
    assert "Secure" not in header and "HttpOnly" in header


@pytest.mark.parametrize("bad_key", ["", "qe_nope", "not a key"])
def test_a_bad_key_is_refused_and_signs_nothing_in(client, bad_key):
    """An unknown key is a 401 page with the form again; the dashboard still asks to sign in."""
    token = csrf_of(client.get("/dashboard/sign-in"))
    response = client.post("/dashboard/sign-in", data={"key": bad_key, "csrf_token": token})
    assert response.status_code == 401
    assert "not valid" in response.get_data(as_text=True)
    assert client.get("/dashboard").status_code == 302


def test_a_revoked_key_cannot_sign_in(app):
    """A revoked key is refused at the sign-in form."""
    client = app.test_client()
    key, _ = new_key(app, "alice")
    with transaction(app.extensions["qe_sessions"]) as session:
        apikeys.revoke_api_key(session, "alice")
    assert sign_in(client, key).status_code == 401


def test_sign_in_without_the_csrf_token_is_refused(app):
    """A sign-in form posted without this session's CSRF token (login CSRF) is a 400; nothing signed in."""
    client = app.test_client()
    key, _ = new_key(app, "alice")
    client.get("/dashboard/sign-in")
    for data in ({"key": key}, {"key": key, "csrf_token": "forged"}):
        response = client.post("/dashboard/sign-in", data=data)
        assert response.status_code == 400 and "CSRF" in response.get_data(as_text=True)
        assert response.mimetype == "text/html"
    assert client.get("/dashboard").status_code == 302


def test_a_dropped_secure_cookie_is_explained(app):
    """Over plain HTTP a browser drops the Secure cookie: the refusal says how to sign in anyway."""
    key, _ = new_key(app, "alice")
    response = app.test_client().post("/dashboard/sign-in", data={"key": key, "csrf_token": "x"})
    assert response.status_code == 400 and "secure_cookies = false" in response.get_data(as_text=True)


def test_sign_out_needs_the_token_then_signs_out(app):
    """Sign-out is a POST with the CSRF token; afterwards the dashboard asks to sign in again."""
    client, _, _ = signed_in(app)
    assert client.post("/dashboard/sign-out").status_code == 400
    assert client.get("/dashboard").status_code == 200
    token = csrf_of(client.get("/dashboard"))
    assert client.post("/dashboard/sign-out", data={"csrf_token": token}).headers["Location"] == "/dashboard/sign-in"
    assert client.get("/dashboard").headers["Location"] == "/dashboard/sign-in"


def test_a_revoked_key_is_signed_out_on_its_next_page(app):
    """Revoking the key ends its dashboard sessions at their next request."""
    client, _, _ = signed_in(app, "alice")
    assert client.get("/dashboard").status_code == 200
    with transaction(app.extensions["qe_sessions"]) as session:
        apikeys.revoke_api_key(session, "alice")
    response = client.get("/dashboard")
    assert response.headers["Location"] == "/dashboard/sign-in"
    assert "no longer valid" in page(client, "/dashboard/sign-in")
    assert client.get("/dashboard").status_code == 302  # the session was cleared, not only refused once


def test_a_sign_in_ends_after_twelve_hours_however_used(app):
    """The session's age is checked on every page: past 12 hours it is signed out, used or not."""
    client, _, _ = signed_in(app)
    assert client.get("/dashboard").status_code == 200
    with client.session_transaction() as session:
        session["signed_in_at"] -= 12 * 3600 + 1
    assert client.get("/dashboard").headers["Location"] == "/dashboard/sign-in"
    assert "over 12 hours old" in page(client, "/dashboard/sign-in")


def test_the_secret_key_is_made_once_and_kept_private(tmp_path, make_app):
    """Without ``secret_key`` a random one is kept in data_dir/secret_key (0600) and reused; a set one wins."""
    make_app()
    path = tmp_path / "secret_key"
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    settings = SimpleNamespace(secret_key=None, data_dir=tmp_path)
    first = load_secret_key(settings)
    assert first == load_secret_key(settings) == path.read_text().strip() and len(first) >= 40
    assert load_secret_key(SimpleNamespace(secret_key="set-by-hand", data_dir=tmp_path)) == "set-by-hand"
    assert make_app(secret_key="set-by-hand").secret_key == "set-by-hand"


# --- headers ---------------------------------------------------------------------


def test_dashboard_pages_send_a_strict_content_security_policy(app):
    """Pages allow only this server's own script and style, never inline; no inline script or style in the HTML."""
    client, key, _ = signed_in(app)
    job_id, batch_id = submit_job(client, key), submit_batch(client, key)
    for path in ("/dashboard/sign-in", "/dashboard", f"/dashboard/jobs/{job_id}", f"/dashboard/batches/{batch_id}",
                 "/dashboard/jobs/job_nope"):
        response = client.get(path)
        policy = response.headers["Content-Security-Policy"]
        assert "default-src 'none'" in policy and "script-src 'self'" in policy and "style-src 'self'" in policy
        assert "unsafe-inline" not in policy and "frame-ancestors 'none'" in policy
        assert response.headers["X-Frame-Options"] == "DENY"
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert response.headers["Cache-Control"] == "no-store"
        html = response.get_data(as_text=True)
        assert "<script>" not in html and " style=" not in html and "http://" not in html and "https://" not in html


def test_static_files_ship_with_the_package(client):
    """The stylesheet and script are served by the app itself (no external assets)."""
    for name, kind in (("dashboard.css", "text/css"), ("dashboard.js", "text/javascript"),
                       ("favicon.svg", "image/svg+xml")):
        response = client.get(f"/static/{name}")
        assert response.status_code == 200 and response.mimetype == kind
        response.close()


def test_api_paths_still_answer_json(client, auth):
    """Unknown /api paths stay JSON 404s; the API ignores the dashboard's cookie and keeps its bearer auth."""
    response = client.get("/api/v1/nothing-here", headers=auth)
    assert response.status_code == 404 and response.is_json
    assert client.get("/api/v1/jobs").status_code == 401


# --- the forms that act: cancel ----------------------------------------------------


def test_cancel_a_batch_needs_the_csrf_token(app):
    """Without the token the batch is untouched (400); with it, it is cancelled and the API says so."""
    client, key, _ = signed_in(app)
    batch_id = submit_batch(client, key)
    for data in ({}, {"csrf_token": "forged"}):
        response = client.post(f"/dashboard/batches/{batch_id}/cancel", data=data)
        assert response.status_code == 400
    assert client.get(f"/api/v1/batches/{batch_id}", headers=bearer(key)).get_json()["status"] == "in_progress"

    token = csrf_of(client.get(f"/dashboard/batches/{batch_id}"))
    response = client.post(f"/dashboard/batches/{batch_id}/cancel", data={"csrf_token": token})
    assert response.headers["Location"] == f"/dashboard/batches/{batch_id}"
    batch = client.get(f"/api/v1/batches/{batch_id}", headers=bearer(key)).get_json()
    assert batch["status"] == "cancelled" and batch["request_counts"]["cancelled"] == 3
    html = page(client, f"/dashboard/batches/{batch_id}")
    assert "Batch cancelled" in html and "Cancel batch" not in html
    # Again: it already ended, which the page says.
    client.post(f"/dashboard/batches/{batch_id}/cancel", data={"csrf_token": token})
    assert "already ended" in page(client, f"/dashboard/batches/{batch_id}")


def cancelled_rows_counted(client):
    """The web's count of cancelled batch rows, from ``/metrics``."""
    samples = re.findall(r'^qe_jobs_ended_total\{([^}]*)\} ([\d.e+]+)$', client.get("/metrics").get_data(as_text=True),
                         re.MULTILINE)
    return sum(float(value) for labels, value in samples
               if 'kind="batch_item"' in labels and 'outcome="cancelled"' in labels)


def test_a_cancel_from_the_page_is_counted_as_the_apis(app):
    """The page cancels through the API's own path, so the cancelled rows reach the metrics."""
    client, key, _ = signed_in(app)
    batch_id = submit_batch(client, key, rows=4)
    before = cancelled_rows_counted(client)
    token = csrf_of(client.get(f"/dashboard/batches/{batch_id}"))
    client.post(f"/dashboard/batches/{batch_id}/cancel", data={"csrf_token": token})
    assert cancelled_rows_counted(client) - before == 4


def test_cancel_a_job_with_the_token(app):
    """The job page's cancel form cancels a queued job; without the token it is a 400."""
    client, key, _ = signed_in(app)
    job_id = submit_job(client, key)
    assert client.post(f"/dashboard/jobs/{job_id}/cancel").status_code == 400
    token = csrf_of(client.get(f"/dashboard/jobs/{job_id}"))
    assert client.post(f"/dashboard/jobs/{job_id}/cancel", data={"csrf_token": token}).status_code == 302
    assert client.get(f"/api/v1/jobs/{job_id}", headers=bearer(key)).get_json()["status"] == "cancelled"
