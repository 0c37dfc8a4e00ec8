"""The web app over Flask's test client, with a fakeredis broker: fast tests
of the HTTP contract. Workers and real Redis are in ``tests/integration``."""

import threading

import fakeredis
import pytest
import redis

from queue_engine.settings import load_settings
from tests.conftest import make_key
from web import create_app


@pytest.fixture(scope="module")
def fake_broker():
    server = fakeredis.TcpFakeServer(("127.0.0.1", 0), server_type="redis")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"redis://127.0.0.1:{server.server_address[1]}/0"
    server.shutdown()
    server.server_close()


@pytest.fixture
def broker(fake_broker):
    client = redis.Redis.from_url(fake_broker)
    client.flushall()
    yield client
    client.close()


@pytest.fixture
def make_app(tmp_path, database_url, fake_broker):
    """Builds the app with settings overrides (the defaults of ``app`` below)."""

    def make(**overrides):
        settings = load_settings(environ={}, **{"data_dir": tmp_path, "database_url": database_url,
                                                "broker_url": fake_broker, "max_body_bytes": 4096, **overrides})
        return create_app(settings)

    return make


@pytest.fixture
def app(make_app):
    return make_app()


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def spec(client):
    return client.get("/api/v1/openapi.json").get_json()


@pytest.fixture
def auth(app):
    key, _ = make_key(app.extensions["qe_sessions"], "alice")
    return {"Authorization": f"Bearer {key.key}"}


@pytest.fixture
def auth_for():
    """An Authorization header for a new key of ``app``."""

    def make(app, name="alice"):
        key, _ = make_key(app.extensions["qe_sessions"], name)
        return {"Authorization": f"Bearer {key.key}"}

    return make
