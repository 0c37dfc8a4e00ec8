"""The jobs API over the Flask test client, with a fakeredis broker.

Every answer is checked against the OpenAPI document the app serves.
"""


import pytest
from sqlalchemy import func, select

from queue_engine import keys
from queue_engine.models import Job
from tests.conftest import make_key
from tests.helpers import assert_matches_openapi

QUEUE = keys.queue_name("tiny")


@pytest.fixture
def other_auth(app):
    key, _ = make_key(app.extensions["qe_sessions"], "bob")
    return {"Authorization": f"Bearer {key.key}"}


def job_count(app):
    with app.extensions["qe_sessions"]() as session:
        return session.scalar(select(func.count()).select_from(Job))


def post_job(client, auth, body, **headers):
    return client.post("/api/v1/jobs", json=body, headers={**auth, **headers})


def test_openapi_document_is_valid(spec):
    """The served document is valid OpenAPI 3.1 and describes the jobs endpoints."""
    from openapi_spec_validator import validate

    validate(spec)
    assert {"/api/v1/jobs", "/api/v1/jobs/{job_id}", "/api/v1/jobs/{job_id}/cancel"} <= set(spec["paths"])


def test_post_job_stores_and_enqueues(client, app, auth, broker, spec):
    """202, a Location header, a queued job object, and one message on the model's interactive lane."""
    response = post_job(client, auth, {"model": "tiny", "prompt": "Hello", "params": {"max_tokens": 8}})
    assert response.status_code == 202
    job = assert_matches_openapi(spec, "/api/v1/jobs", "post", response)
    assert response.headers["Location"].endswith(f"/api/v1/jobs/{job['id']}")
    assert (job["status"], job["kind"], job["priority"], job["attempts"]) == ("queued", "single", "interactive", 0)
    assert broker.llen(QUEUE) == 1
    assert job["id"].encode() in broker.lindex(QUEUE, 0)


def test_a_bulk_priority_job_travels_the_job_queue_and_keeps_its_lane(client, auth, broker):
    """The bulk queue carries batch chunks only; priority=bulk is applied in the engine."""
    response = post_job(client, auth, {"model": "tiny", "prompt": "x", "priority": "bulk"})
    assert response.status_code == 202 and response.get_json()["priority"] == "bulk"
    assert (broker.llen(QUEUE), broker.llen(keys.queue_name("tiny", "bulk"))) == (1, 0)


@pytest.mark.parametrize("body, field", [
    ({"prompt": "x"}, "model"),
    ({"model": "tiny", "prompt": "x", "colour": "red"}, "colour"),
    ({"model": "tiny", "prompt": "   "}, "prompt"),
    ({"model": "tiny"}, "exactly one of 'prompt' or 'messages'"),
    ({"model": "tiny", "prompt": "x", "messages": [{"role": "user", "content": "x"}]}, "exactly one"),
    ({"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
    ({"model": "tiny", "messages": []}, "messages"),
    ({"model": "tiny", "prompt": "x", "params": {"max_tokens": 0}}, "params.max_tokens"),
    ({"model": "tiny", "prompt": "x", "params": {"max_tokens": 100000}}, "params.max_tokens"),
    ({"model": "tiny", "prompt": "x", "params": {"temperature": 2.5}}, "params.temperature"),
    ({"model": "tiny", "prompt": "x", "params": {"top_p": 0}}, "params.top_p"),
    ({"model": "tiny", "prompt": "x", "params": {"stop": [""]}}, "params.stop"),
    ({"model": "tiny", "prompt": "x", "params": {"seed": "abc"}}, "params.seed"),
    ({"model": "tiny", "prompt": "x", "params": {"beam_width": 4}}, "params.beam_width"),
    ({"model": "tiny", "prompt": "x", "webhook_url": "ftp://example.com/hook"}, "webhook_url"),
    ({"model": "tiny", "prompt": "x", "metadata": {"k": 1}}, "metadata.k"),
    ({"model": "tiny", "prompt": "x", "priority": "urgent"}, "priority"),
    ({"model": "gpt-9", "prompt": "x"}, "model: no model profile 'gpt-9'"),
])
def test_bad_job_fields_are_named_and_change_nothing(client, app, auth, broker, spec, body, field):
    """Each bad field is a 400 whose message names it; nothing is stored or enqueued."""
    response = post_job(client, auth, body)
    assert response.status_code == 400
    error = assert_matches_openapi(spec, "/api/v1/jobs", "post", response)["error"]
    assert field in error["message"]
    assert job_count(app) == 0 and broker.llen(QUEUE) == 0


@pytest.mark.parametrize("data, message", [
    (b"{not json", "not valid JSON (Expecting property name enclosed in double quotes at character 2)"),
    (b"[1, 2]", "the request body must be a JSON object, not an array"),
    (b"", "the request body is empty; send a JSON object"),
])
def test_non_json_body_is_refused(client, app, auth, broker, data, message):
    """A body that is not a JSON object is a 400 saying why."""
    response = client.post("/api/v1/jobs", data=data, headers={**auth, "Content-Type": "application/json"})
    assert response.status_code == 400
    assert response.get_json()["error"] == {"code": "invalid_json", "message": message}
    assert job_count(app) == 0 and broker.llen(QUEUE) == 0


def test_oversized_body_is_refused(client, app, auth, broker, spec):
    """A body over max_body_bytes is a 413 JSON error; nothing stored."""
    response = post_job(client, auth, {"model": "tiny", "prompt": "x" * 5000})
    assert response.status_code == 413
    assert "max_body_bytes" in assert_matches_openapi(spec, "/api/v1/jobs", "post", response)["error"]["message"]
    assert job_count(app) == 0 and broker.llen(QUEUE) == 0


def test_missing_or_bad_key_is_401(client, spec):
    """No key, a malformed header or an unknown key: 401 with a JSON error."""
    for headers in ({}, {"Authorization": "Basic abc"}, {"Authorization": "Bearer qe_nope"}):
        response = client.get("/api/v1/jobs", headers=headers)
        assert response.status_code == 401
        assert assert_matches_openapi(spec, "/api/v1/jobs", "get", response)["error"]["code"] == "unauthorized"


def test_other_keys_jobs_are_404(client, auth, other_auth, spec):
    """A key sees only its own jobs: others' are 404, never 403, and absent from lists."""
    job = post_job(client, auth, {"model": "tiny", "prompt": "mine"}).get_json()
    for response in (client.get(f"/api/v1/jobs/{job['id']}", headers=other_auth),
                     client.post(f"/api/v1/jobs/{job['id']}/cancel", headers=other_auth)):
        assert response.status_code == 404
        assert response.get_json()["error"]["code"] == "not_found"
    assert client.get("/api/v1/jobs", headers=other_auth).get_json()["data"] == []
    response = client.get(f"/api/v1/jobs/{job['id']}", headers=auth)
    assert assert_matches_openapi(spec, "/api/v1/jobs/{job_id}", "get", response)["id"] == job["id"]


def test_idempotency_key_over_http(client, app, auth, broker):
    """The same Idempotency-Key returns the first job and enqueues once; a different body is 409."""
    body = {"model": "tiny", "prompt": "once"}
    first = post_job(client, auth, body, **{"Idempotency-Key": "abc"}).get_json()
    again = post_job(client, auth, body, **{"Idempotency-Key": "abc"})
    assert again.status_code == 202 and again.get_json()["id"] == first["id"]
    assert job_count(app) == 1 and broker.llen(QUEUE) == 1
    conflict = post_job(client, auth, {**body, "prompt": "twice"}, **{"Idempotency-Key": "abc"})
    assert conflict.status_code == 409 and conflict.get_json()["error"]["code"] == "idempotency_conflict"


def test_cancel_queued_job_then_again_is_409(client, auth, spec):
    """Cancelling a queued job answers the cancelled job; cancelling it again is 409."""
    job = post_job(client, auth, {"model": "tiny", "prompt": "x"}).get_json()
    response = client.post(f"/api/v1/jobs/{job['id']}/cancel", headers=auth)
    assert assert_matches_openapi(spec, "/api/v1/jobs/{job_id}/cancel", "post", response)["status"] == "cancelled"
    again = client.post(f"/api/v1/jobs/{job['id']}/cancel", headers=auth)
    assert again.status_code == 409 and again.get_json()["error"]["code"] == "job_finished"


def test_list_jobs_pages_with_cursor(client, auth, spec):
    """GET /jobs pages newest first with next_cursor, and filters by status."""
    ids = [post_job(client, auth, {"model": "tiny", "prompt": str(i)}).get_json()["id"] for i in range(3)]
    first = client.get("/api/v1/jobs?limit=2", headers=auth)
    page = assert_matches_openapi(spec, "/api/v1/jobs", "get", first)
    second = client.get(f"/api/v1/jobs?limit=2&cursor={page['next_cursor']}", headers=auth).get_json()
    assert [j["id"] for j in page["data"] + second["data"]] == ids[::-1]
    assert second["next_cursor"] is None
    assert client.get("/api/v1/jobs?status=succeeded", headers=auth).get_json()["data"] == []
    bad = client.get("/api/v1/jobs?limit=500", headers=auth)
    assert bad.status_code == 400 and "limit" in bad.get_json()["error"]["message"]


def test_health_and_readiness(client, spec):
    """/healthz answers without a key; /readyz checks the database and the broker."""
    assert assert_matches_openapi(spec, "/healthz", "get", client.get("/healthz")) == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert assert_matches_openapi(spec, "/readyz", "get", ready)["checks"] == {"database": "ok", "broker": "ok"}
