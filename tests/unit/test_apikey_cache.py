"""API keys looked up once per TTL: ``queue_engine.apikeys.ApiKeyCache``."""

import pytest
from sqlalchemy import update

from queue_engine.apikeys import ApiKeyCache, KeyIdentity
from queue_engine.db import transaction
from queue_engine.models import ApiKey, utcnow
from tests.conftest import make_key


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


class CountingSessions:
    """``get_session`` for the cache that counts the lookups it causes."""

    def __init__(self, sessions):
        self.sessions, self.calls, self.open = sessions, 0, []

    def __call__(self):
        self.calls += 1
        session = self.sessions()
        self.open.append(session)
        return session

    def close(self):
        for session in self.open:
            session.close()


@pytest.fixture
def counting(sessions):
    counting = CountingSessions(sessions)
    yield counting
    counting.close()


def revoke(sessions, owner_id):
    with transaction(sessions) as session:
        session.execute(update(ApiKey).where(ApiKey.id == owner_id).values(revoked_at=utcnow()))


def test_apikey_cache_skips_the_lookup_within_the_ttl(sessions, counting):
    """A second request with the same key within the TTL does not touch the database."""
    key, owner_id = make_key(sessions, "alice")
    cache = ApiKeyCache(5, clock=Clock())
    assert cache.find(counting, key.key) == KeyIdentity(owner_id, "alice")
    assert cache.find(counting, key.key) == KeyIdentity(owner_id, "alice")
    assert counting.calls == 1


def test_apikey_cache_revocation_takes_effect_within_the_check_interval(sessions, counting):
    """A revoked key is refused at the first look at the keys' signature after
    the revocation (every 0.2 s), long before its entry's TTL runs out."""
    key, owner_id = make_key(sessions, "alice")
    clock = Clock()
    cache = ApiKeyCache(5, clock=clock)
    assert cache.find(counting, key.key) is not None
    revoke(sessions, owner_id)
    clock.now += 0.1
    assert cache.find(counting, key.key) is not None  # within the interval: no look yet
    clock.now += 0.15
    assert cache.find(counting, key.key) is None


def test_apikey_cache_sees_new_limits_within_the_check_interval(sessions, counting):
    """Limits set on a cached key are in its identity from the next look, not after the TTL."""
    key, owner_id = make_key(sessions, "alice")
    clock = Clock()
    cache = ApiKeyCache(5, clock=clock)
    assert cache.find(counting, key.key).max_waiting_rows is None
    with transaction(sessions) as session:
        session.execute(update(ApiKey).where(ApiKey.id == owner_id).values(max_waiting_rows=7))
    clock.now += 0.2
    assert cache.find(counting, key.key) == KeyIdentity(owner_id, "alice", max_waiting_rows=7)


def test_apikey_cache_does_not_keep_unknown_keys(sessions, counting):
    """An unknown key is looked up each time (a key created later works at once); non-keys never are."""
    cache = ApiKeyCache(5, clock=Clock())
    assert cache.find(counting, "qe_nope") is None
    assert cache.find(counting, "qe_nope") is None
    assert cache.find(counting, "not-a-key") is None
    assert counting.calls == 2


def test_apikey_cache_ttl_zero_looks_up_every_time(sessions, counting):
    """With a TTL of 0 every request looks its key up, so a revocation is immediate."""
    key, owner_id = make_key(sessions, "alice")
    cache = ApiKeyCache(0, clock=Clock())
    assert cache.find(counting, key.key) is not None
    revoke(sessions, owner_id)
    assert cache.find(counting, key.key) is None
    assert counting.calls == 2


def test_apikey_cache_refuses_a_negative_ttl():
    """The TTL is validated in the constructor."""
    with pytest.raises(ValueError, match="ttl must be 0 or more"):
        ApiKeyCache(-1)


def test_web_uses_the_key_cache(make_app, auth_for):
    """The app answers a revoked key's requests for at most the TTL (here 0: at once)."""
    app = make_app(api_key_cache_seconds=0)
    headers = auth_for(app)
    client = app.test_client()
    assert client.get("/api/v1/jobs", headers=headers).status_code == 200
    with app.extensions["qe_sessions"]() as session:
        owner_id = session.query(ApiKey.id).filter_by(name="alice").scalar()
    revoke(app.extensions["qe_sessions"], owner_id)
    assert client.get("/api/v1/jobs", headers=headers).status_code == 401
