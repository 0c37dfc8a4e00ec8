"""Fixtures shared by unit and integration tests: settings and databases.

Database tests run twice, on SQLite and on PostgreSQL (a fresh database per
test run on the server at 127.0.0.1:5432, or ``QUEUE_ENGINE_TEST_POSTGRES``).
"""

import os
import secrets
from contextlib import contextmanager

import pytest
from sqlalchemy import delete

from queue_engine.apikeys import create_api_key
from queue_engine.db import make_engine, make_session_factory, transaction, upgrade_database
from queue_engine.models import ApiKey, Batch, File, Job, LeaderLease, ScalingState, UsageDaily, WebhookEvent, WorkerAllocation
from queue_engine.settings import load_settings

POSTGRES_ADMIN_URL = os.environ.get("QUEUE_ENGINE_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


@contextmanager
def new_postgres_database():
    """A new, migrated PostgreSQL database on the server at ``POSTGRES_ADMIN_URL``,
    dropped on exit; skips the test where no server is reachable."""
    import psycopg

    admin = POSTGRES_ADMIN_URL.replace("postgresql+psycopg://", "postgresql://")
    name = f"qe_test_{secrets.token_hex(4)}"
    try:
        connection = psycopg.connect(admin, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as e:
        pytest.skip(f"no PostgreSQL reachable at {POSTGRES_ADMIN_URL} ({e}); PostgreSQL tests skipped")
    with connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    url = POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    try:
        upgrade_database(url)
        yield url
    finally:
        with psycopg.connect(admin, autocommit=True) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def postgres_url():
    """A new, empty PostgreSQL database for this test run, dropped at the end."""
    with new_postgres_database() as url:
        yield url


@pytest.fixture(scope="session")
def sqlite_url(tmp_path_factory):
    url = f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'queue-engine.db'}"
    upgrade_database(url)
    return url


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request):
    """Each database test runs on SQLite and on PostgreSQL, starting empty."""
    url = request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "postgres_url")
    yield url
    engine = make_engine(url)
    with engine.begin() as connection:
        connection.execute(delete(WebhookEvent))  # its attempts go with it (ON DELETE CASCADE)
        connection.execute(delete(Job))
        connection.execute(delete(File))
        connection.execute(delete(Batch))  # its chunks go with it
        connection.execute(delete(UsageDaily))
        connection.execute(delete(ApiKey))
        connection.execute(delete(WorkerAllocation))
        connection.execute(delete(ScalingState))
        connection.execute(delete(LeaderLease))
    engine.dispose()


@pytest.fixture
def sessions(database_url):
    engine = make_engine(database_url)
    yield make_session_factory(engine)
    engine.dispose()


@pytest.fixture
def settings(tmp_path, database_url):
    return load_settings(environ={}, data_dir=tmp_path, database_url=database_url)


def make_key(sessions, name):
    with transaction(sessions) as session:
        new_key = create_api_key(session, name)
        owner_id = session.query(ApiKey.id).filter_by(name=name).scalar()
    return new_key, owner_id
