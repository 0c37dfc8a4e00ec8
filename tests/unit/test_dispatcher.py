"""Accepting work while the broker is down, and the dispatcher that sends it,
over the Flask test client with a fakeredis broker (fast; real Redis killed
and restarted is in tests/integration/test_chaos.py)."""

import io

import pytest
from sqlalchemy import func, select

from queue_engine import keys
from queue_engine.models import BatchChunk, Job
from queue_engine.settings import ModelProfile
from tests.helpers import assert_matches_openapi, free_port
from workers.dispatcher import Dispatcher

QUEUE, BULK = keys.queue_name("tiny"), keys.queue_name("tiny", "bulk")
TWO_MODELS = {"tiny-b": ModelProfile(path="tiny", engine_args={"max_model_len": 256, "seed": 1})}


@pytest.fixture
def down_app(make_app):
    """The app with its broker on a port where nothing listens."""
    return make_app(broker_url=f"redis://127.0.0.1:{free_port()}/0", models=TWO_MODELS)


def submit_everything(app, auth):
    client = app.test_client()
    answers = [
        client.post("/api/v1/jobs", json={"model": "tiny", "prompt": "x"}, headers=auth),
        client.post("/api/v1/tribunals", headers=auth, json={
            "prompt": "x", "candidates": ["tiny", "tiny-b"], "judge": "tiny", "bypass": "auto"}),
        client.post("/api/v1/batches", headers=auth, content_type="multipart/form-data",
                    data={"model": "tiny", "file": (io.BytesIO(b"prompt\na\nb\n"), "f.csv")}),
    ]
    return answers


def unsent(app):
    """``(jobs, chunks)`` that wait in the database for a message."""
    with app.extensions["qe_sessions"]() as session:
        jobs = session.scalar(select(func.count()).select_from(Job).where(
            Job.status == "queued", Job.batch_id.is_(None), Job.kind != "tribunal", Job.dispatched_at.is_(None)))
        chunks = session.scalar(select(func.count()).select_from(BatchChunk).where(BatchChunk.state == "pending"))
    return jobs, chunks


def test_with_the_broker_down_every_submission_is_accepted_and_stored_unsent(down_app, auth_for, spec):
    """202 for a job, a tribunal (whose bypass reads the database) and a batch;
    their messages wait in the database; /readyz is ready, and says the broker is down."""
    answers = submit_everything(down_app, auth_for(down_app))
    assert [answer.status_code for answer in answers] == [202, 202, 202]
    assert answers[1].get_json()["tribunal"]["readings"]["backlog"] == 1
    assert unsent(down_app) == (3, 1), "the job, the two candidates, the batch's chunk"
    ready = down_app.test_client().get("/readyz")
    body = assert_matches_openapi(spec, "/readyz", "get", ready)
    assert ready.status_code == 200 and body["status"] == "degraded"
    assert body["checks"]["database"] == "ok" and body["checks"]["broker"].startswith("error")


def test_the_dispatcher_sends_what_waited_when_the_broker_answers(down_app, auth_for, make_app, broker):
    submit_everything(down_app, auth_for(down_app))
    up_app = make_app(models=TWO_MODELS)
    dispatcher = Dispatcher(up_app.extensions["celery"], up_app.extensions["qe_sessions"],
                            up_app.extensions["qe_settings"])
    dispatcher.run_once()
    assert unsent(up_app) == (0, 0)
    assert (broker.llen(QUEUE), broker.llen(keys.queue_name("tiny-b")), broker.llen(BULK)) == (2, 1, 1)
    dispatcher.run_once()
    assert broker.llen(QUEUE) == 2, "sent once"


def test_a_broker_that_lost_its_data_gets_every_waiting_message_again(make_app, auth_for, broker):
    """The marker key is gone (Redis restarted empty): everything waiting is sent again, once."""
    app = make_app(models=TWO_MODELS, dispatcher={"check_interval": 0.001})  # every round checks
    dispatcher = Dispatcher(app.extensions["celery"], app.extensions["qe_sessions"], app.extensions["qe_settings"])
    dispatcher.run_once()
    assert broker.get(keys.BROKER_MARKER) is not None
    submit_everything(app, auth_for(app))
    broker.flushall()
    dispatcher.run_once()
    assert (broker.llen(QUEUE), broker.llen(keys.queue_name("tiny-b")), broker.llen(BULK)) == (2, 1, 1)
    dispatcher.run_once()
    assert (broker.llen(QUEUE), broker.llen(BULK)) == (2, 1), "the marker is back: nothing is sent twice"


def test_a_message_the_broker_lost_alone_is_sent_again_after_two_checks(app, auth, broker):
    """One message gone (popped by a worker killed before it recorded it): the
    oldest sent is the one missing; after two checks in a row it is sent again
    (after one it might be a message in transit)."""
    dispatcher = Dispatcher(app.extensions["celery"], app.extensions["qe_sessions"], app.extensions["qe_settings"])
    dispatcher.run_once()  # the marker
    client = app.test_client()
    first, _ = (client.post("/api/v1/jobs", json={"model": "tiny", "prompt": p}, headers=auth).get_json()["id"]
                for p in ("first", "second"))
    broker.rpop(QUEUE)  # the oldest message
    dispatcher.find_lost_messages()
    dispatcher.send_due()
    assert broker.llen(QUEUE) == 1
    dispatcher.find_lost_messages()
    dispatcher.send_due()
    assert broker.llen(QUEUE) == 2 and first.encode() in broker.lindex(QUEUE, 0)
