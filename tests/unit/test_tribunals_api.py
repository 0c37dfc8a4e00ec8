"""``POST /api/v1/tribunals`` over the Flask test client, with a fakeredis broker:
validation, the first steps on the queues, and the bypass decision read from
the backlog the database holds. Every answer is checked against the OpenAPI document."""

import base64
import io
import json

import pytest
from sqlalchemy import func, select

from queue_engine import keys
from queue_engine.models import Job
from queue_engine.settings import ModelProfile
from tests.helpers import assert_matches_openapi

TWO_MODELS = {"tiny-b": ModelProfile(path="tiny", engine_args={"max_model_len": 256, "seed": 1})}
BODY = {"prompt": "What is a tuple?", "candidates": ["tiny", "tiny-b", "tiny"], "judge": "tiny-b",
        "params": {"max_tokens": 16}}


@pytest.fixture
def app(make_app):
    return make_app(models=TWO_MODELS, tribunal={"bypass_backlog": 100})


def post_tribunal(client, auth, body, **headers):
    return client.post("/api/v1/tribunals", json=body, headers={**auth, **headers})


def job_count(app):
    with app.extensions["qe_sessions"]() as session:
        return session.scalar(select(func.count()).select_from(Job))


def queued_job_ids(broker, model):
    """The job ids of the task messages waiting on ``model``'s interactive queue."""
    messages = [json.loads(m) for m in broker.lrange(keys.queue_name(model), 0, -1)]
    return sorted(json.loads(base64.b64decode(m["body"]))[0][0] for m in messages)


def queue_rows(client, auth, model, count):
    """A batch of ``count`` rows for ``model``: a backlog of ``count`` bulk requests."""
    data = io.BytesIO(("prompt\n" + "".join(f"row {i}\n" for i in range(count))).encode())
    response = client.post("/api/v1/batches", headers=auth,
                           data={"model": model, "file": (data, "rows.csv")}, content_type="multipart/form-data")
    assert response.status_code == 202


def test_a_tribunal_is_a_job_whose_candidates_go_to_their_models_queues(client, app, auth, broker, spec):
    response = post_tribunal(client, auth, {**BODY, "bypass": "never"})
    assert response.status_code == 202
    job = assert_matches_openapi(spec, "/api/v1/tribunals", "post", response)
    assert response.headers["Location"].endswith(f"/api/v1/jobs/{job['id']}")
    assert (job["kind"], job["status"], job["model"]) == ("tribunal", "queued", "tiny")
    trace = job["tribunal"]
    assert [c["model"] for c in trace["candidates"]] == ["tiny", "tiny-b", "tiny"]
    assert len({c["seed"] for c in trace["candidates"]}) == 3
    assert (trace["bypass"], trace["bypassed"], trace["readings"], trace["critique"]) == ("never", False, None, None)
    with app.extensions["qe_sessions"]() as session:
        steps = {s.id: s.model for s in session.scalars(select(Job).where(Job.parent_id == job["id"]))}
    assert queued_job_ids(broker, "tiny") == sorted(i for i, m in steps.items() if m == "tiny")
    assert queued_job_ids(broker, "tiny-b") == sorted(i for i, m in steps.items() if m == "tiny-b")
    read = client.get(f"/api/v1/jobs/{job['id']}", headers=auth)
    assert assert_matches_openapi(spec, "/api/v1/jobs/{job_id}", "get", read)["tribunal"] == trace


def test_auto_reads_the_queues_and_runs_in_full_when_they_are_quiet(client, auth, broker, spec):
    queue_rows(client, auth, "tiny", 64)  # under the threshold of 100
    job = post_tribunal(client, auth, BODY).get_json()
    trace = job["tribunal"]
    assert (trace["bypass"], trace["bypassed"], trace["reason"]) == ("auto", False, None)
    assert trace["readings"]["backlog"] == 64 and trace["readings"]["threshold"] == 100
    assert trace["readings"]["queues"]["qe.tiny.bulk"] == {"waiting": 64, "reserved": 0, "requests": 64}
    assert set(trace["readings"]["queues"]) == {
        "qe.tiny.interactive", "qe.tiny.bulk", "qe.tiny-b.interactive", "qe.tiny-b.bulk"}
    assert len(queued_job_ids(broker, "tiny")) == 2


def test_auto_bypasses_when_the_backlog_is_over_the_threshold(client, auth, broker, spec):
    """128 batch rows waiting for the judge's model: one step, on the first candidate's model."""
    queue_rows(client, auth, "tiny-b", 128)
    response = post_tribunal(client, auth, BODY)
    trace = assert_matches_openapi(spec, "/api/v1/tribunals", "post", response)["tribunal"]
    assert trace["bypassed"] is True
    assert "128" in trace["reason"] and "tribunal.bypass_backlog" in trace["reason"]
    assert trace["readings"]["backlog"] == 128
    assert [c["model"] for c in trace["candidates"]] == ["tiny"]
    assert len(queued_job_ids(broker, "tiny")) == 1 and queued_job_ids(broker, "tiny-b") == []


def test_always_bypasses_and_never_ignores_the_backlog(client, auth, broker):
    queue_rows(client, auth, "tiny", 640)
    always = post_tribunal(client, auth, {**BODY, "bypass": "always"}).get_json()["tribunal"]
    assert always["bypassed"] and "always" in always["reason"] and always["readings"] is None
    never = post_tribunal(client, auth, {**BODY, "bypass": "never"}).get_json()["tribunal"]
    assert not never["bypassed"] and len(never["candidates"]) == 3


def test_bypasses_are_counted_in_the_metrics(client, auth, broker):
    def count(run):
        text = client.get("/metrics").get_data(as_text=True)
        line = next((ln for ln in text.splitlines()
                     if ln.startswith(f'qe_tribunals_total{{deployment="main",run="{run}"}}')), None)
        return float(line.split()[-1]) if line else 0.0

    before = {run: count(run) for run in ("full", "bypassed_under_load", "bypassed_on_request")}
    post_tribunal(client, auth, {**BODY, "bypass": "always"})
    post_tribunal(client, auth, BODY)
    queue_rows(client, auth, "tiny", 128)
    post_tribunal(client, auth, BODY)
    after = {run: count(run) for run in before}
    assert {run: after[run] - before[run] for run in before} == {
        "full": 1, "bypassed_under_load": 1, "bypassed_on_request": 1}


@pytest.mark.parametrize("change, field", [
    ({"candidates": []}, "candidates"),
    ({"candidates": ["tiny", "gpt-9"]}, "candidates.1"),
    ({"judge": "gpt-9"}, "judge"),
    ({"reviser": "gpt-9"}, "reviser"),
    ({"candidates": ["tiny"] * 9}, "candidates"),
    ({"bypass": "sometimes"}, "bypass"),
    ({"params": {"max_tokens": 300}}, "params.max_tokens"),
    ({"params": {"best_of": 2}}, "params.best_of"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "prompt"),
    ({"prompt": "  "}, "prompt"),
    ({"webhook_url": "ftp://example.com"}, "webhook_url"),
])
def test_bad_tribunals_are_named_and_change_nothing(client, app, auth, broker, spec, change, field):
    response = post_tribunal(client, auth, {**BODY, **change})
    assert response.status_code == 400
    error = assert_matches_openapi(spec, "/api/v1/tribunals", "post", response)["error"]
    assert field in error["message"]
    assert job_count(app) == 0
    assert broker.llen(keys.queue_name("tiny")) == broker.llen(keys.queue_name("tiny-b")) == 0


def test_idempotency_key_replays_the_tribunal_without_sending_again(client, auth, broker):
    first = post_tribunal(client, auth, BODY, **{"Idempotency-Key": "t-1"}).get_json()
    again = post_tribunal(client, auth, BODY, **{"Idempotency-Key": "t-1"})
    assert again.status_code == 202 and again.get_json()["id"] == first["id"]
    assert len(queued_job_ids(broker, "tiny")) + len(queued_job_ids(broker, "tiny-b")) == 3
    conflict = post_tribunal(client, auth, {**BODY, "judge": "tiny"}, **{"Idempotency-Key": "t-1"})
    assert conflict.status_code == 409


def test_cancel_a_queued_tribunal(client, app, auth, broker, spec):
    job = post_tribunal(client, auth, {**BODY, "bypass": "never"}).get_json()
    response = client.post(f"/api/v1/jobs/{job['id']}/cancel", headers=auth)
    assert assert_matches_openapi(spec, "/api/v1/jobs/{job_id}/cancel", "post", response)["status"] == "cancelled"
    with app.extensions["qe_sessions"]() as session:
        steps = session.scalars(select(Job.status).where(Job.parent_id == job["id"])).all()
    assert steps == ["cancelled"] * 3
