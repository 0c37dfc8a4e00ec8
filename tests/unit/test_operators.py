"""Operator keys and revocation over the Flask test client: an operator sees
and cancels any key's work, lists the models and revokes keys; an ordinary
key sees only its own; a revoked key is refused at once, by the API or the CLI."""

import io

import pytest
from click.testing import CliRunner
from sqlalchemy import select

from queue_engine.apikeys import create_api_key
from queue_engine.cli import main
from queue_engine.db import make_sessions, transaction, upgrade_database
from queue_engine.models import ApiKey, Batch, Job
from queue_engine.settings import load_settings
from tests.conftest import make_key
from tests.helpers import assert_matches_openapi, wait_until
from web.server import ensure_embedded_key


def operator_key(app, name="ops"):
    with transaction(app.extensions["qe_sessions"]) as session:
        key = create_api_key(session, name, is_operator=True)
    return {"Authorization": f"Bearer {key.key}"}


def ordinary_key(app, name):
    key, _ = make_key(app.extensions["qe_sessions"], name)
    return {"Authorization": f"Bearer {key.key}"}


def upload(client, headers, rows=3):
    data = "id,prompt\n" + "".join(f"{n},row {n}\n" for n in range(rows))
    form = {"model": "tiny", "file": (io.BytesIO(data.encode()), "rows.csv")}
    response = client.post("/api/v1/batches", data=form, headers=headers, content_type="multipart/form-data")
    assert response.status_code == 202
    return response.get_json()["id"]


def status_of(app, model, item_id):
    with app.extensions["qe_sessions"]() as session:
        return session.get(model, item_id).status


@pytest.fixture
def keys(app):
    """Headers of alice and bob (ordinary) and of an operator."""
    return {"alice": ordinary_key(app, "alice"), "bob": ordinary_key(app, "bob"), "ops": operator_key(app)}


def test_an_operator_reads_and_cancels_another_keys_job(app, client, keys, spec):
    """Bob gets 404 for Alice's job; the operator reads it and cancels it."""
    job_id = client.post("/api/v1/jobs", json={"model": "tiny", "prompt": "x"}, headers=keys["alice"]).get_json()["id"]
    assert client.get(f"/api/v1/jobs/{job_id}", headers=keys["bob"]).status_code == 404
    assert client.post(f"/api/v1/jobs/{job_id}/cancel", headers=keys["bob"]).status_code == 404
    response = client.get(f"/api/v1/jobs/{job_id}", headers=keys["ops"])
    assert assert_matches_openapi(spec, "/api/v1/jobs/{job_id}", "get", response)["id"] == job_id
    response = client.post(f"/api/v1/jobs/{job_id}/cancel", headers=keys["ops"])
    assert response.status_code == 200 and response.get_json()["status"] == "cancelled"
    assert status_of(app, Job, job_id) == "cancelled"


def test_an_operator_reads_and_cancels_another_keys_batch(app, client, keys):
    """Bob gets 404 for Alice's batch, its results and its cancel; the operator gets all three, on /v1 too."""
    batch_id = upload(client, keys["alice"])
    for path in (f"/api/v1/batches/{batch_id}", f"/api/v1/batches/{batch_id}/results", f"/v1/batches/{batch_id}"):
        assert client.get(path, headers=keys["bob"]).status_code == 404
        assert client.get(path, headers=keys["ops"]).status_code == 200
    assert client.post(f"/api/v1/batches/{batch_id}/cancel", headers=keys["bob"]).status_code == 404
    response = client.post(f"/api/v1/batches/{batch_id}/cancel", headers=keys["ops"])
    assert response.status_code == 200 and response.get_json()["status"] == "cancelled"
    assert status_of(app, Batch, batch_id) == "cancelled"


def test_an_operators_list_shows_only_its_own_work(client, keys):
    """Listing stays per key: an operator reads others' work by id, it does not list it."""
    client.post("/api/v1/jobs", json={"model": "tiny", "prompt": "x"}, headers=keys["alice"])
    assert client.get("/api/v1/jobs", headers=keys["ops"]).get_json()["data"] == []


def test_the_models_list_is_an_operators(client, keys):
    """GET /api/v1/models: 200 for an operator, 403 operator_only for an ordinary key."""
    assert client.get("/api/v1/models", headers=keys["ops"]).status_code == 200
    response = client.get("/api/v1/models", headers=keys["alice"])
    assert response.status_code == 403 and response.get_json()["error"]["code"] == "operator_only"


def test_an_operator_revokes_a_key_and_cancels_its_work(app, client, keys, spec):
    """POST /api/v1/keys/alice/revoke {"cancel_work": true}: Alice is refused at once, her queued job and her
    batch are cancelled; Bob's work is untouched."""
    job_id = client.post("/api/v1/jobs", json={"model": "tiny", "prompt": "x"}, headers=keys["alice"]).get_json()["id"]
    batch_id = upload(client, keys["alice"])
    bobs = client.post("/api/v1/jobs", json={"model": "tiny", "prompt": "x"}, headers=keys["bob"]).get_json()["id"]
    response = client.post("/api/v1/keys/alice/revoke", json={"cancel_work": True}, headers=keys["ops"])
    body = assert_matches_openapi(spec, "/api/v1/keys/{name}/revoke", "post", response)
    assert (body["name"], body["cancelled_jobs"], body["cancelled_batches"]) == ("alice", 1, 1)
    assert client.get("/api/v1/jobs", headers=keys["alice"]).status_code == 401
    assert (status_of(app, Job, job_id), status_of(app, Batch, batch_id)) == ("cancelled", "cancelled")
    assert status_of(app, Job, bobs) == "queued"


def test_revoking_keeps_the_work_unless_asked(app, client, keys):
    """Without cancel_work (an empty body) the key is revoked and its work runs on."""
    job_id = client.post("/api/v1/jobs", json={"model": "tiny", "prompt": "x"}, headers=keys["alice"]).get_json()["id"]
    response = client.post("/api/v1/keys/alice/revoke", headers=keys["ops"])
    assert response.status_code == 200 and response.get_json()["cancelled_jobs"] == 0
    assert status_of(app, Job, job_id) == "queued"
    assert client.get("/api/v1/jobs", headers=keys["alice"]).status_code == 401


@pytest.mark.parametrize("headers, path, body, status, code", [
    ("alice", "/api/v1/keys/bob/revoke", {}, 403, "operator_only"),
    ("ops", "/api/v1/keys/nobody/revoke", {}, 404, "not_found"),
    ("ops", "/api/v1/keys/bob/revoke", {"cancel_work": "yes"}, 400, "invalid_request"),
    ("ops", "/api/v1/keys/bob/revoke", {"cancel": True}, 400, "invalid_request"),
])
def test_revoke_refusals(client, keys, spec, headers, path, body, status, code):
    """Only an operator revokes; an unknown key is a 404; a bad body a 400 naming the field; Bob still works."""
    response = client.post(path, json=body, headers=keys[headers])
    assert response.status_code == status
    assert assert_matches_openapi(spec, "/api/v1/keys/{name}/revoke", "post", response)["error"]["code"] == code
    assert client.get("/api/v1/jobs", headers=keys["bob"]).status_code == 200


def test_a_key_revoked_from_the_cli_is_refused_at_once_by_a_process_that_cached_it(
        make_app, database_url, tmp_path):
    """The web app has just looked Alice's key up (trusted for 5 s); `keys revoke alice` in another
    process's code path makes it answer 401 within a second."""
    app = make_app(api_key_cache_seconds=5)
    client, headers = app.test_client(), ordinary_key(app, "alice")
    assert client.get("/api/v1/jobs", headers=headers).status_code == 200
    env = {"QUEUE_ENGINE_DATA_DIR": str(tmp_path), "QUEUE_ENGINE_DATABASE_URL": database_url, "QUEUE_ENGINE_CONFIG": ""}
    result = CliRunner().invoke(main, ["keys", "revoke", "alice"], env=env)
    assert result.exit_code == 0, result.output
    assert "revoked" in result.output and "runs on" in result.output
    wait_until(lambda: client.get("/api/v1/jobs", headers=headers).status_code == 401, 1.0, "the revoked key refused")


def test_the_embedded_key_is_an_operator(tmp_path):
    """The key embedded mode creates on its first start owns the install: it is an operator key."""
    settings = load_settings(environ={}, data_dir=tmp_path)
    upgrade_database(settings.sqlalchemy_url)
    new_key = ensure_embedded_key(settings)
    with transaction(make_sessions(settings.sqlalchemy_url)) as session:
        assert session.scalar(select(ApiKey.is_operator).where(ApiKey.name == new_key.name)) is True
