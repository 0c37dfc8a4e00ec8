"""Nothing accepted is ever lost: faults injected into real parts.

A redis-server and a PostgreSQL cluster of this module's own (so killing and
restarting them touches nothing else), a real `queue-engine serve` (the web
and its dispatcher), real `queue-engine worker` processes running vLLM on
the tiny model, and a webhook receiver. Each test submits single jobs, a
tribunal, a batch and jobs with webhooks, breaks one part while that work is
in flight, and checks that every accepted item ends, none ran twice, and
every webhook event arrived. (The faults and the figures: tests/chaos.py.)
"""

import pytest
import requests

from tests.chaos import (
    Rig,
    killed_between_commit_and_send,
    postgres_restarted,
    redis_down_while_submitting,
    redis_restarted_empty,
    worker_killed_while_taking,
)
from tests.helpers import RedisServer
from tests.postgres import PostgresServer, server_binaries

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(server_binaries() is None,
                       reason="PostgreSQL's server binaries (initdb, pg_ctl) are not installed; "
                              "`make test` installs them (apt-get install postgresql)"),
]

LEASE = 3


@pytest.fixture(scope="module")
def postgres():
    server = PostgresServer()
    yield server
    server.destroy()


@pytest.fixture(scope="module")
def rig(tmp_path_factory, tiny_model_dir, postgres):
    redis = RedisServer(tmp_path_factory.mktemp("chaos-redis"))
    rig = Rig(tmp_path_factory.mktemp("chaos"), tiny_model_dir, postgres.url, redis, lease_seconds=LEASE)
    rig.start_serve()
    rig.start_worker()
    yield rig
    rig.close()
    redis.process.kill()


def assert_nothing_lost_nothing_twice(figures):
    assert figures["lost"] == 0 and figures["ended"] == figures["accepted"], figures
    assert figures["run_twice"] == 0, figures
    assert figures["webhook_events_delivered"] == figures["webhook_events"], figures


def test_redis_restarted_empty_loses_nothing(rig):
    """Redis SIGKILLed mid-run and back empty: every job, tribunal, batch row and
    webhook event that was only on the broker is sent again, and runs once."""
    figures = redis_restarted_empty(rig, outage=1.0, jobs=9, rows=300)
    assert_nothing_lost_nothing_twice(figures)


def test_submissions_while_redis_is_down_are_accepted_and_run_when_it_returns(rig):
    """With the broker down every submission is a 202 and stored; /readyz says
    the broker is down but the service is ready; all of it runs once Redis is back."""
    figures = redis_down_while_submitting(rig, outage=3.0, jobs=6, rows=100)
    assert figures["readyz_while_down"] == [200, "degraded"]
    assert_nothing_lost_nothing_twice(figures)
    checks = requests.get(rig.url + "/readyz", timeout=10).json()
    assert checks == {"status": "ok", "checks": {"database": "ok", "broker": "ok"}}


def test_postgres_restarted_mid_run_ends_everything_once(rig, postgres):
    """PostgreSQL down for longer than a lease while work runs: serve, worker and
    dispatcher reconnect; what finished meanwhile is stored, not run again."""
    figures = postgres_restarted(rig, postgres, outage=2 * LEASE, jobs=9, rows=200)
    assert_nothing_lost_nothing_twice(figures)


def test_a_worker_killed_while_taking_messages_strands_nothing(rig):
    """A worker SIGKILLed twice while it takes messages from a deep queue (where
    kombu can lose a message it popped): nothing is stranded, and each time the
    dead worker's jobs run elsewhere within about a lease, not after the broker's
    visibility timeout (an hour)."""
    figures = worker_killed_while_taking(rig, kills=2, jobs=200)
    assert_nothing_lost_nothing_twice(figures)
    assert all(seconds < 10 * LEASE for seconds in figures["seconds_to_recover_each_kill"]), figures


def test_a_process_killed_between_commit_and_send_loses_nothing(rig):
    """`serve` dies right after committing a job and a batch, a worker right after
    committing a tribunal's next step: the stored work is found unsent and runs."""
    figures = killed_between_commit_and_send(rig)
    assert figures["serve_at_fault"] == ["died", "died"]
    assert figures["worker_exit_at_fault"] == 86
    assert_nothing_lost_nothing_twice(figures)
