"""``GET /v1/models`` (OpenAI's Models API) over the Flask test client, and
with the official ``openai`` client, unchanged, against a real server thread."""

import openai
import pytest

from queue_engine.settings import load_settings
from tests.conftest import make_key
from tests.helpers import WebInProcess, assert_matches_openapi


def test_v1_models_lists_every_profile_in_openais_shape(make_app, auth_for, spec):
    """Every configured profile, sorted, in OpenAI's list shape; one reads alone the same."""
    app = make_app(models={"big": {"path": "/models/big"}})
    client, auth = app.test_client(), auth_for(app)
    response = client.get("/v1/models", headers=auth)
    assert response.status_code == 200
    listed = assert_matches_openapi(spec, "/v1/models", "get", response)
    assert listed["object"] == "list"
    assert [m["id"] for m in listed["data"]] == ["big", "tiny"]
    assert {(m["object"], m["owned_by"]) for m in listed["data"]} == {("model", "queue-engine")}
    one = client.get("/v1/models/big", headers=auth)
    assert assert_matches_openapi(spec, "/v1/models/{model_id}", "get", one) == listed["data"][0]


def test_v1_models_unknown_is_404_and_no_key_is_401_in_openais_shape(client, auth, spec):
    """An unknown model is a 404 and a missing key a 401, both in OpenAI's error shape."""
    missing = client.get("/v1/models/nope", headers=auth)
    assert missing.status_code == 404
    assert assert_matches_openapi(spec, "/v1/models/{model_id}", "get", missing)["error"]["code"] == "not_found"
    anonymous = client.get("/v1/models")
    assert anonymous.status_code == 401
    assert assert_matches_openapi(spec, "/v1/models", "get", anonymous)["error"]["type"] == "invalid_request_error"


@pytest.fixture
def server(tmp_path, database_url, fake_broker):
    web = WebInProcess(load_settings(environ={}, data_dir=tmp_path, database_url=database_url,
                                     broker_url=fake_broker))
    yield web
    web.close()


def test_v1_models_with_the_openai_client(server):
    """The official client, unchanged: list, retrieve, NotFoundError, AuthenticationError."""
    key, _ = make_key(server.sessions, "alice")
    client = openai.OpenAI(api_key=key.key, base_url=server.url + "/v1", max_retries=0)
    assert [m.id for m in client.models.list()] == ["tiny"]
    assert client.models.retrieve("tiny").owned_by == "queue-engine"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(api_key="wrong", base_url=server.url + "/v1", max_retries=0).models.list()
