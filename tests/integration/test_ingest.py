"""A 100,000-row upload to a real `queue-engine serve` (PostgreSQL, Redis):
accepted whole, every row stored in a chunk, the broker given only the
bulk window's few chunks of it (the rest wait for their fair share), and the
server's peak memory stays bounded (the file is never held whole)."""

import math

import pytest
import redis
import requests
from sqlalchemy import func, select

from queue_engine.client import Client
from queue_engine.db import make_sessions
from queue_engine.models import BatchChunk, Job
from tests.conftest import make_key
from tests.helpers import free_port, spawn, stop_process, wait_until

pytestmark = pytest.mark.integration

ROWS = 100_000
PEAK_RSS_LIMIT_MB = 300


def peak_rss_mb(pid):
    """The process's peak resident set size (VmHWM), in MiB."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM in /proc status")


@pytest.fixture
def server(tmp_path, redis_server, cluster_database_url):
    """`queue-engine serve` in cluster mode, on a Redis database no worker reads."""
    port = free_port()
    broker_url = redis_server.url.rsplit("/", 1)[0] + "/7"
    env = {"QUEUE_ENGINE_BROKER_URL": broker_url, "QUEUE_ENGINE_DATABASE_URL": cluster_database_url,
           "QUEUE_ENGINE_DATA_DIR": str(tmp_path / "data")}
    process = spawn(["serve", "--port", str(port)], env, tmp_path / "serve.log")
    url = f"http://127.0.0.1:{port}"

    def answers():
        assert process.poll() is None, (tmp_path / "serve.log").read_text()
        try:
            return requests.get(url + "/healthz", timeout=1).ok
        except requests.ConnectionError:
            return False

    wait_until(answers, 60, "queue-engine serve to answer")
    broker = redis.Redis.from_url(broker_url)
    broker.flushdb()
    yield process, url, broker
    stop_process(process)
    broker.close()


def test_a_100k_row_upload_is_stored_with_bounded_memory_and_sent_a_window_at_a_time(server, cluster_database_url, tmp_path):
    process, url, broker = server
    sessions = make_sessions(cluster_database_url)
    key, _ = make_key(sessions, "bulk-uploader")
    path = tmp_path / "rows.csv"
    with open(path, "w") as f:
        f.write("id,prompt\n")
        f.writelines(f"r{i},Summarise the following support ticket number {i} in one sentence.\n" for i in range(ROWS))

    batch = Client(url, key.key, timeout=300).submit_batch(path, "tiny", params={"max_tokens": 16})

    assert batch["status"] == "in_progress"
    assert batch["request_counts"]["total"] == ROWS
    with sessions() as session:
        stored = session.scalar(select(func.count(Job.id)).where(Job.batch_id == batch["id"]))
    assert stored == ROWS
    with sessions() as session:
        chunks = dict(session.execute(select(BatchChunk.state, func.count()).group_by(BatchChunk.state)).all())
    assert sum(chunks.values()) == math.ceil(ROWS / 64), "one chunk per 64 rows"
    wait_until(lambda: broker.llen("qe.tiny.bulk") == 2, 10, "the dispatcher to fill the bulk window (2 chunks)")
    assert peak_rss_mb(process.pid) <= PEAK_RSS_LIMIT_MB
    sessions.kw["bind"].dispose()
