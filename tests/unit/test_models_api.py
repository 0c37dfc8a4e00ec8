"""``GET /api/v1/models``: per profile the backlog, what workers run, the SLURM
workers by state and the autoscaler's last decision, over the Flask test
client with a fakeredis broker."""

import pytest

from queue_engine import allocations
from queue_engine.apikeys import create_api_key
from queue_engine.db import transaction
from tests.helpers import assert_matches_openapi


@pytest.fixture
def operator_for():
    """An Authorization header for a new operator key of ``app``: the models list is theirs only."""

    def make(app, name="ops"):
        with transaction(app.extensions["qe_sessions"]) as session:
            key = create_api_key(session, name, is_operator=True)
        return {"Authorization": f"Bearer {key.key}"}

    return make


def models_of(client, auth, spec):
    response = client.get("/api/v1/models", headers=auth)
    assert response.status_code == 200
    return {m["model"]: m for m in assert_matches_openapi(spec, "/api/v1/models", "get", response)["data"]}


def test_every_profile_is_listed_with_its_backlog_and_workers(make_app, operator_for, spec, broker):
    app = make_app(models={"big": {"path": "/models/big", "slurm": {"max_workers": 2}}})
    client, auth = app.test_client(), operator_for(app)
    for _ in range(3):
        assert client.post("/api/v1/jobs", json={"model": "big", "prompt": "x"}, headers=auth).status_code == 202
    with transaction(app.extensions["qe_sessions"]) as session:
        allocations.record_submitted(session, "main", "big", "101")
        allocations.record_submitted(session, "main", "big", "102")
        allocations.register_worker(session, "main", "102", node="gpu07")
    models = models_of(client, auth, spec)
    assert set(models) == {"big", "tiny"}
    big = models["big"]
    assert (big["backlog"], big["in_flight"], big["slurm"]) == (3, 0, True)
    assert big["queues"]["qe.big.interactive"] == {"waiting": 3, "reserved": 0, "requests": 3}
    assert big["workers"] == {"pending": 1, "starting": 0, "serving": 1, "stopping": 0}
    assert big["scaling"] is None  # the autoscaler has not decided yet
    assert models["tiny"]["slurm"] is False


def test_the_last_decision_and_an_error_state_are_shown(make_app, operator_for, spec):
    app = make_app(models={"big": {"path": "/models/big", "slurm": {}}})
    with transaction(app.extensions["qe_sessions"]) as session:
        state = allocations.scaling_state(session, "main", "big")
        for _ in range(3):
            allocations.count_failure(state, "job 7 ended FAILED (exit 1:0) before serving", delay=40, error_after=3)
        state.action, state.desired, state.reason = "wait", 1, "backing off after 3 failed starts"
    scaling = models_of(app.test_client(), operator_for(app), spec)["big"]["scaling"]
    assert (scaling["state"], scaling["action"], scaling["failures"]) == ("error", "wait", 3)
    assert scaling["last_failure"] == "job 7 ended FAILED (exit 1:0) before serving"
    assert scaling["retry_at"] is not None


def test_the_models_list_needs_a_key(client):
    """No key: 401."""
    assert client.get("/api/v1/models").status_code == 401


def test_the_models_list_is_for_operators_only(client, auth, spec):
    """An ordinary key gets 403 operator_only: the list shows the whole service's load."""
    response = client.get("/api/v1/models", headers=auth)
    assert response.status_code == 403
    assert assert_matches_openapi(spec, "/api/v1/models", "get", response)["error"]["code"] == "operator_only"
