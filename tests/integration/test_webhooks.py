"""Webhooks end to end: real Redis, a real `queue-engine worker` (vLLM on the
tiny model), `queue-engine serve` delivering, and a real receiver on
loopback that verifies every signature with the ``standardwebhooks`` library."""

import io
import re
import secrets

import pytest
import requests

from queue_engine import apikeys
from queue_engine.client import Client
from queue_engine.db import transaction
from tests.conftest import make_key
from tests.helpers import wait_until
from tests.integration.conftest import Cluster
from tests.receiver import Receiver

pytestmark = pytest.mark.integration

#: Short retry delays, so a schedule plays out in seconds (jitter still applies).
RETRY_DELAYS = "0.3,0.6,1.2,2.4,4.8"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_model_dir, redis_server, cluster_database_url):
    cluster = Cluster(tmp_path_factory.mktemp("webhooks"), tiny_model_dir, redis_server.url, cluster_database_url,
                      lease_seconds=3, webhook_allow="127.0.0.0/8", webhook_retry_delays=RETRY_DELAYS)
    cluster.start_webhook_delivery()
    cluster.start_worker()
    yield cluster
    cluster.stop()


class User:
    """A key, its client, and a receiver that knows the key's webhook secret."""

    def __init__(self, cluster):
        self.name = f"u-{secrets.token_hex(4)}"
        key, _ = make_key(cluster.sessions, self.name)
        self.client = Client(cluster.url, key.key)
        self.receiver = Receiver(secrets=[key.webhook_secret])

    def submit(self, prompt="Say hello", **fields):
        body = {"model": "tiny", "prompt": prompt, "params": {"max_tokens": 4}, "webhook_url": self.receiver.url}
        return self.client.submit_job({**body, **fields})["id"]

    def event_of(self, work_id):
        [event] = self.client.webhooks(work_id)["events"]
        return event

    def wait_for_event(self, work_id, status, timeout=60):
        def ended():
            events = self.client.webhooks(work_id)["events"]
            return events and events[0]["status"] == status and events[0]
        return wait_until(ended, timeout, f"the webhook of {work_id} to be {status}", 0.1)


@pytest.fixture
def user(cluster):
    user = User(cluster)
    yield user
    user.receiver.stop()


def attempts_counted(cluster):
    """``qe_webhook_attempts_total`` by result, from the delivering `serve`'s /metrics."""
    text = requests.get(cluster.delivery_url + "/metrics", timeout=5).text
    return {m.group(1): float(m.group(2))
            for m in re.finditer(r'^qe_webhook_attempts_total\{deployment="\w+",result="(\w+)"\} ([\d.e+]+)$', text, re.M)}


def test_a_receiver_failing_twice_gets_three_attempts_with_one_id(cluster, user):
    counted_before = attempts_counted(cluster)
    user.receiver.script([500, 503])
    job_id = user.submit()
    event = user.wait_for_event(job_id, "delivered")
    arrived = user.receiver.of(event["webhook_id"])
    assert [d.status for d in arrived] == [500, 503, 200]
    assert all(d.verified_by == [0] for d in arrived)  # every attempt signed with the key's secret
    assert len({d.headers["webhook-id"] for d in arrived}) == 1
    job = user.client.get_job(job_id)
    assert arrived[-1].body == {"type": "job.completed", "timestamp": arrived[-1].body["timestamp"], "data": job}
    attempts = user.client.webhooks(job_id)["data"]
    assert [(a["attempt"], a["status_code"]) for a in attempts] == [(1, 500), (2, 503), (3, 200)]
    assert user.receiver.accepted() == arrived[-1:]  # delivered once
    counted = attempts_counted(cluster)
    assert counted["pending"] - counted_before.get("pending", 0) >= 2
    assert counted["delivered"] - counted_before.get("delivered", 0) >= 1


def test_a_receiver_that_was_down_gets_the_event_once_it_is_back(user):
    user.receiver.stop()
    job_id = user.submit()

    def refused_twice():
        return len(user.client.webhooks(job_id)["data"]) >= 2

    wait_until(refused_twice, 60, "two refused attempts", 0.05)
    user.receiver.start()
    event = user.wait_for_event(job_id, "delivered")
    attempts = user.client.webhooks(job_id)["data"]
    assert all(a["status_code"] is None and "refused" in a["error"].lower() for a in attempts[:-1])
    assert attempts[-1]["status_code"] == 200
    [arrived] = user.receiver.of(event["webhook_id"])
    assert arrived.verified_by == [0] and arrived.body["data"]["status"] == "succeeded"


def test_410_gone_stops_the_retries(user):
    user.receiver.script([410])
    job_id = user.submit()
    event = user.wait_for_event(job_id, "failed")
    assert [d.status for d in user.receiver.of(event["webhook_id"])] == [410]
    assert [a["status_code"] for a in user.client.webhooks(job_id)["data"]] == [410]
    # Sent again on request, with the same id; this time the receiver takes it.
    assert user.client.redeliver_webhook(job_id)["webhook_id"] == event["webhook_id"]
    user.wait_for_event(job_id, "delivered")
    assert [d.status for d in user.receiver.of(event["webhook_id"])] == [410, 200]


def test_retry_after_is_honoured(user):
    user.receiver.script([(429, {"Retry-After": "2"})])
    job_id = user.submit()
    event = user.wait_for_event(job_id, "delivered")
    first, second = user.receiver.of(event["webhook_id"])
    assert first.status == 429 and second.at - first.at >= 1.9  # the schedule alone would wait about 0.3 s


def test_a_failed_job_is_announced_as_job_failed(user):
    job_id = user.submit(prompt="word " * 600)  # longer than the model's context: the engine refuses it
    event = user.wait_for_event(job_id, "delivered")
    [arrived] = user.receiver.of(event["webhook_id"])
    assert arrived.body["type"] == "job.failed"
    assert arrived.body["data"]["error"]["code"] == "engine_rejected"


def test_a_batch_event_arrives_once_with_the_right_counts(user):
    rows = "id,prompt\n" + "".join(f"r{i},Question {i}\n" for i in range(40)) + "bad,   \n"
    batch = user.client.submit_batch(io.BytesIO(rows.encode()), "tiny", filename="rows.csv",
                                     params={"max_tokens": 2}, webhook_url=user.receiver.url)
    event = user.wait_for_event(batch["id"], "delivered", timeout=120)
    [arrived] = user.receiver.of(event["webhook_id"])
    assert arrived.verified_by == [0] and arrived.body["type"] == "batch.completed"
    assert arrived.body["data"]["request_counts"] == {"total": 41, "completed": 40, "failed": 1, "cancelled": 0}
    assert arrived.body["data"] == user.client.get_batch(batch["id"])
    assert "data" not in arrived.body["data"]  # the batch object, not its rows


def test_during_a_secret_rotation_each_secret_verifies(cluster, user):
    old_secret = user.receiver.secrets[0]
    with transaction(cluster.sessions) as session:
        new_secret, _ = apikeys.rotate_webhook_secret(session, user.name, grace_hours=1)
    user.receiver.secrets = [old_secret, new_secret]
    event = user.wait_for_event(user.submit(), "delivered")
    [arrived] = user.receiver.of(event["webhook_id"])
    assert arrived.verified_by == [0, 1]
    assert len(arrived.headers["webhook-signature"].split(" ")) == 2
