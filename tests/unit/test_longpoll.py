"""Long-poll: ``GET /api/v1/jobs/{id}?wait=S`` and ``/api/v1/batches/{id}?wait=S``."""

import threading
import time

import pytest

from tests.helpers import wait_until
from tests.unit.test_batches_api import csv_text, upload

#: A wait far longer than any of these tests should take.
LONG = 20


@pytest.fixture
def job_id(client, auth):
    response = client.post("/api/v1/jobs", json={"model": "tiny", "prompt": "Hello"}, headers=auth)
    return response.get_json()["id"]


def get_in_thread(app, path, auth):
    """GET ``path`` from another thread; returns (thread, result dict with response and seconds)."""
    result = {}

    def get():
        start = time.monotonic()
        result["response"] = app.test_client().get(path, headers=auth)
        result["seconds"] = time.monotonic() - start

    thread = threading.Thread(target=get, daemon=True)
    thread.start()
    return thread, result


def wait_for_waiter(app):
    wait_until(lambda: "qe_end_watcher" in app.extensions and app.extensions["qe_end_watcher"].waiting(),
               10, "a request waiting for its item to end")


def test_longpoll_job_already_ended_answers_at_once(client, auth, job_id):
    """A job that has ended is answered at once, however long the wait asked."""
    client.post(f"/api/v1/jobs/{job_id}/cancel", headers=auth)
    start = time.monotonic()
    response = client.get(f"/api/v1/jobs/{job_id}?wait={LONG}", headers=auth)
    assert response.status_code == 200 and response.get_json()["status"] == "cancelled"
    assert time.monotonic() - start < LONG / 4


def test_longpoll_job_answers_when_it_ends_during_the_wait(app, client, auth, job_id):
    """A waiting GET answers with the ended job soon after it ends, well before the deadline."""
    thread, result = get_in_thread(app, f"/api/v1/jobs/{job_id}?wait={LONG}", auth)
    wait_for_waiter(app)
    assert "response" not in result
    assert client.post(f"/api/v1/jobs/{job_id}/cancel", headers=auth).status_code == 200
    thread.join(LONG + 10)
    assert result["response"].status_code == 200
    assert result["response"].get_json()["status"] == "cancelled"
    assert result["seconds"] < LONG / 2
    assert app.extensions["qe_end_watcher"].waiting() == 0


def test_longpoll_job_answers_unfinished_after_the_wait(client, auth, job_id):
    """Nothing happens: after S seconds the job comes back as it is, still queued."""
    start = time.monotonic()
    response = client.get(f"/api/v1/jobs/{job_id}?wait=0.5", headers=auth)
    assert response.status_code == 200 and response.get_json()["status"] == "queued"
    assert 0.5 <= time.monotonic() - start < LONG


def test_longpoll_batch_answers_when_it_ends_during_the_wait(app, client, auth):
    """A waiting batch GET answers once the batch is cancelled from elsewhere."""
    batch = upload(client, auth, csv_text([("a", "x"), ("b", "y")])).get_json()
    thread, result = get_in_thread(app, f"/api/v1/batches/{batch['id']}?wait={LONG}", auth)
    wait_for_waiter(app)
    assert client.post(f"/api/v1/batches/{batch['id']}/cancel", headers=auth).status_code == 200
    thread.join(LONG + 10)
    assert result["response"].status_code == 200
    assert result["response"].get_json()["status"] == "cancelled"
    assert result["seconds"] < LONG / 2


def test_longpoll_many_waiters_share_one_watcher(app, client, auth):
    """Several waiters on several jobs are all woken, each by its own job's end."""
    ids = [client.post("/api/v1/jobs", json={"model": "tiny", "prompt": str(i)}, headers=auth).get_json()["id"]
           for i in range(5)]
    waits = [get_in_thread(app, f"/api/v1/jobs/{job_id}?wait={LONG}", auth) for job_id in ids]
    wait_until(lambda: "qe_end_watcher" in app.extensions and app.extensions["qe_end_watcher"].waiting() == 5,
               10, "five waiting requests")
    for job_id in ids:
        client.post(f"/api/v1/jobs/{job_id}/cancel", headers=auth)
    for thread, result in waits:
        thread.join(LONG + 10)
        assert result["response"].get_json()["status"] == "cancelled" and result["seconds"] < LONG / 2


@pytest.mark.parametrize("wait", ["-1", "abc", "nan", "inf", "31", ""])
def test_longpoll_bad_wait_is_a_400_naming_wait(client, auth, job_id, wait):
    """A wait that is not a number from 0 to max_wait is refused, naming the parameter."""
    for path in (f"/api/v1/jobs/{job_id}?wait={wait}", "/api/v1/batches/batch_x?wait=" + wait):
        response = client.get(path, headers=auth)
        assert response.status_code == 400
        error = response.get_json()["error"]
        assert error["param"] == "wait" and "wait" in error["message"] and error["code"]


def test_longpoll_wait_zero_answers_at_once(client, auth, job_id):
    """wait=0 is a plain read."""
    response = client.get(f"/api/v1/jobs/{job_id}?wait=0", headers=auth)
    assert response.status_code == 200 and response.get_json()["status"] == "queued"
