"""Webhooks over the HTTP API (Flask test client, fakeredis broker): a
``webhook_url`` the service may not call is a 400 that stores nothing, and
the attempt lists and redelivery endpoints answer as the OpenAPI document says."""

import io

import pytest
from sqlalchemy import func, select

from queue_engine import keys, webhooks
from queue_engine.db import transaction
from queue_engine.models import Batch, Job, WebhookEvent
from tests.helpers import assert_matches_openapi
from tests.work import claim_job, succeed

PUBLIC = "http://93.184.215.14/hook"  # an address literal: no DNS needed


def stored(app):
    with app.extensions["qe_sessions"]() as session:
        return session.scalar(select(func.count(Job.id))), session.scalar(select(func.count(Batch.id)))


def submissions(url):
    """A job, a tribunal and a batch with ``webhook_url`` = ``url``: ``(path, kwargs)`` for the test client."""
    return [
        ("/api/v1/jobs", {"json": {"model": "tiny", "prompt": "x", "webhook_url": url}}),
        ("/api/v1/tribunals", {"json": {"prompt": "x", "candidates": ["tiny"], "judge": "tiny", "webhook_url": url}}),
        ("/api/v1/batches", {"data": {"model": "tiny", "webhook_url": url,
                                      "file": (io.BytesIO(b"prompt\nx\n"), "f.csv")},
                             "content_type": "multipart/form-data"}),
    ]


@pytest.mark.parametrize("url, why", [
    ("http://169.254.169.254/latest/meta-data/", "link-local"),
    ("http://10.0.0.1/hook", "private"),
    ("http://[::1]:8080/hook", "loopback"),
    ("http://[::ffff:7f00:1]/hook", "loopback"),
    ("http://localhost:8080/hook", "'localhost' resolves to"),
    ("gopher://example.org/", "http:// or https://"),
])
def test_a_forbidden_webhook_url_is_a_400_that_stores_and_sends_nothing(client, app, auth, broker, spec, url, why):
    for path, request in submissions(url):
        response = client.post(path, headers=auth, **request)
        body = assert_matches_openapi(spec, path, "post", response)
        assert response.status_code == 400, (path, body)
        assert body["error"]["message"].startswith("webhook_url: ") and why in body["error"]["message"]
        assert body["error"]["param"] == "webhook_url"
    assert stored(app) == (0, 0)
    assert broker.llen(keys.queue_name("tiny")) == broker.llen(keys.queue_name("tiny", "bulk")) == 0


def test_a_public_address_is_accepted_and_webhook_allow_admits_loopback(make_app, auth_for):
    app = make_app(webhook_allow=["127.0.0.0/8"])
    client, auth = app.test_client(), auth_for(app)
    for url in (PUBLIC, "http://127.0.0.1:9/hook"):
        for path, request in submissions(url):
            response = client.post(path, headers=auth, **request)
            assert response.status_code == 202, (path, response.get_json())
    assert stored(app) == (8, 2)  # per URL: a job, a tribunal and its step, a batch and its row


def ended_job_with_attempts(app, client, auth, outcomes):
    """A job that succeeded, its event, and one recorded attempt per outcome."""
    response = client.post("/api/v1/jobs", headers=auth,
                           json={"model": "tiny", "prompt": "x", "webhook_url": PUBLIC})
    job_id = response.get_json()["id"]
    sessions = app.extensions["qe_sessions"]
    with transaction(sessions) as session:
        claim_job(session, job_id)
    with transaction(sessions) as session:
        assert succeed(session, app.extensions["qe_settings"], job_id, text="hi").ended == [job_id]  # records the event
        event = session.scalars(select(WebhookEvent).where(WebhookEvent.job_id == job_id)).one()
    for outcome in outcomes:
        with transaction(sessions) as session:
            session.execute(WebhookEvent.__table__.update().values(next_attempt_at=webhooks.utcnow()))
            webhooks.claim_due(session)
            attempt = webhooks.start_attempt(session, event.id)
            webhooks.finish_attempt(session, attempt, outcome, [0.0, 0.0])
    return job_id, event.id


def test_the_attempt_list_shows_every_attempt_and_where_the_event_stands(client, app, auth, broker, spec):
    outcomes = [webhooks.Outcome(status_code=500, error="HTTP 500", duration_ms=3),
                webhooks.Outcome(error="no answer: ConnectionRefusedError", duration_ms=1),
                webhooks.Outcome(status_code=200, duration_ms=5)]
    job_id, event_id = ended_job_with_attempts(app, client, auth, outcomes)
    path = "/api/v1/jobs/{job_id}/webhooks"
    body = assert_matches_openapi(spec, path, "get", client.get(f"/api/v1/jobs/{job_id}/webhooks", headers=auth))
    assert [(a["webhook_id"], a["event"], a["attempt"], a["status_code"]) for a in body["data"]] == [
        (event_id, "job.completed", 1, 500), (event_id, "job.completed", 2, None), (event_id, "job.completed", 3, 200)]
    assert body["data"][1]["error"] == "no answer: ConnectionRefusedError"
    [event] = body["events"]
    assert (event["status"], event["attempts"], event["url"]) == ("delivered", 3, PUBLIC)


def test_redeliver_makes_the_last_event_due_again_with_the_same_id(client, app, auth, broker, spec):
    job_id, event_id = ended_job_with_attempts(app, client, auth, [webhooks.Outcome(status_code=410, error="HTTP 410")])
    path = "/api/v1/jobs/{job_id}/webhooks/redeliver"
    response = client.post(f"/api/v1/jobs/{job_id}/webhooks/redeliver", headers=auth)
    event = assert_matches_openapi(spec, path, "post", response)
    assert response.status_code == 202
    assert (event["webhook_id"], event["status"], event["attempts"]) == (event_id, "pending", 1)


def test_webhook_endpoints_of_work_without_an_event_or_of_another_key(client, app, auth, auth_for, broker, spec):
    job_id = client.post("/api/v1/jobs", headers=auth, json={"model": "tiny", "prompt": "x"}).get_json()["id"]
    assert client.get(f"/api/v1/jobs/{job_id}/webhooks", headers=auth).get_json() == {"data": [], "events": []}
    response = client.post(f"/api/v1/jobs/{job_id}/webhooks/redeliver", headers=auth)
    error = assert_matches_openapi(spec, "/api/v1/jobs/{job_id}/webhooks/redeliver", "post", response)["error"]
    assert response.status_code == 409 and error["code"] == "no_webhook_event"
    stranger = auth_for(app, "mallory")
    assert client.get(f"/api/v1/jobs/{job_id}/webhooks", headers=stranger).status_code == 404
    assert client.post(f"/api/v1/jobs/{job_id}/webhooks/redeliver", headers=stranger).status_code == 404


def test_a_cancelled_batch_lists_its_event_and_can_be_redelivered(client, app, auth, broker, spec):
    form = {"model": "tiny", "webhook_url": PUBLIC, "file": (io.BytesIO(b"prompt\na\nb\n"), "f.csv")}
    batch_id = client.post("/api/v1/batches", data=form, headers=auth, content_type="multipart/form-data").get_json()["id"]
    assert client.post(f"/api/v1/batches/{batch_id}/cancel", headers=auth).get_json()["status"] == "cancelled"
    body = assert_matches_openapi(spec, "/api/v1/batches/{batch_id}/webhooks", "get",
                                  client.get(f"/api/v1/batches/{batch_id}/webhooks", headers=auth))
    [event] = body["events"]
    assert (event["event"], event["status"], body["data"]) == ("batch.cancelled", "pending", [])
    response = client.post(f"/api/v1/batches/{batch_id}/webhooks/redeliver", headers=auth)
    assert response.status_code == 202 and response.get_json()["webhook_id"] == event["webhook_id"]
