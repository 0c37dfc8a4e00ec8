"""OpenAI's parameter names in a job's ``params`` (queue_engine.params.Params),
through POST /api/v1/jobs: each bad value is a 400 naming the field, and a job
stores only the new parameters it asked for."""

import pytest

from queue_engine.models import Job
from queue_engine.params import Params

SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "v", "schema": {"enum": ["a"]}, "strict": True}}


def submit(client, auth, **params):
    return client.post("/api/v1/jobs", json={"model": "tiny", "prompt": "hi", "params": params}, headers=auth)


@pytest.mark.parametrize("params, field", [
    ({"n": 0}, "params.n"),
    ({"n": 17}, "params.n"),
    ({"presence_penalty": 2.5}, "params.presence_penalty"),
    ({"frequency_penalty": -3.0}, "params.frequency_penalty"),
    ({"logprobs": 21}, "params.logprobs"),
    ({"top_logprobs": 2}, "params"),  # without logprobs: true
    ({"max_tokens": 5, "max_completion_tokens": 6}, "params"),
    ({"stop": [""]}, "params.stop.0"),
    ({"stop": ["x"] * 17}, "params.stop"),
    ({"response_format": {"type": "xml"}}, "params.response_format.type"),
    ({"response_format": {"type": "json_schema"}}, "params.response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}},
     "params.response_format.json_schema.name"),
    ({"logit_bias": {"1": 5}}, "params.logit_bias"),
    ({"tools": []}, "params.tools"),
])
def test_bad_or_unsupported_parameters_are_400_naming_them(client, auth, params, field):
    """Each bad value, and each OpenAI parameter the service does not support, is a 400 naming it."""
    response = submit(client, auth, **params)
    assert response.status_code == 400, response.get_json()
    assert response.get_json()["error"]["param"] == field


def stored_params(app, response):
    assert response.status_code == 202, response.get_json()
    with app.extensions["qe_sessions"]() as session:
        return session.get(Job, response.get_json()["id"]).params


def test_a_job_stores_only_the_parameters_it_asked_for(app, client, auth):
    """Unasked new parameters are left out of the stored params; OpenAI's aliases are normalised."""
    plain = stored_params(app, submit(client, auth, max_completion_tokens=7, stop="end"))
    assert plain == {"max_tokens": 7, "temperature": 1.0, "top_p": 1.0, "stop": ["end"], "seed": None}
    asked = stored_params(app, submit(client, auth, n=2, logprobs=True, top_logprobs=3, response_format=SCHEMA_FORMAT))
    assert (asked["n"], asked["top_logprobs"]) == (2, 3)
    assert asked["response_format"]["json_schema"]["schema"] == {"enum": ["a"]}


def test_params_keep_their_meaning_after_a_round_trip():
    """Stored params validate back to the same Params (a retried job samples as asked)."""
    params = Params.model_validate({"stop": "x", "n": 3, "logprobs": 2, "response_format": {"type": "json_object"}})
    assert Params.model_validate(params.model_dump()) == params
