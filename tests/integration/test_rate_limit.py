"""``requests_per_minute`` across web processes: two app instances (as two
gunicorn workers or two hosts would run) count against one counter on a
real redis-server, so together they let through exactly the limit."""

import redis

from queue_engine import apikeys
from queue_engine.db import make_sessions, transaction, upgrade_database
from queue_engine.keys import rate_key
from queue_engine.settings import load_settings
from tests.conftest import make_key
from web import create_app


class Clock:
    def __init__(self, now):
        self.now = now

    def __call__(self):
        return self.now


def test_two_web_processes_share_one_rate_limit(tmp_path, redis_server):
    """A key of 5 requests a minute gets 5 answers from two apps together, alternating; the 6th and 7th are
    429 rate_limited on either, with the same Retry-After; the next minute it is let through again."""
    database_url = f"sqlite:///{tmp_path}/rate.db"
    upgrade_database(database_url)
    settings = load_settings(environ={}, data_dir=tmp_path, database_url=database_url, broker_url=redis_server.url)
    apps = [create_app(settings), create_app(settings)]
    clock = Clock(9_000_000.0 + 20.0)  # 20 s into a minute; the same wall clock in both
    for app in apps:
        app.extensions["qe_rate_limiter"].clock = clock
    sessions = make_sessions(database_url)
    key, owner_id = make_key(sessions, "alice")
    with transaction(sessions) as session:
        apikeys.set_key_limits(session, "alice", requests_per_minute=5)
    headers = {"Authorization": f"Bearer {key.key}"}
    clients = [app.test_client() for app in apps]
    answers = [clients[n % 2].get("/api/v1/jobs", headers=headers) for n in range(7)]
    assert [answer.status_code for answer in answers] == [200] * 5 + [429] * 2
    assert {answer.get_json()["error"]["code"] for answer in answers[5:]} == {"rate_limited"}
    assert {answer.headers["Retry-After"] for answer in answers[5:]} == {"40"}
    counter = redis.Redis.from_url(redis_server.url)
    assert int(counter.get(rate_key(owner_id, int(clock.now // 60)))) == 7
    assert 0 < counter.ttl(rate_key(owner_id, int(clock.now // 60))) <= 120
    clock.now += 40
    assert [client.get("/api/v1/jobs", headers=headers).status_code for client in clients] == [200, 200]
