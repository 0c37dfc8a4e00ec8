"""`queue-engine serve --workers N`: the production server of cluster mode
(gunicorn, several processes) against a real redis-server and database."""

from pathlib import Path

import pytest
import redis
import requests

from queue_engine import keys
from queue_engine.db import make_sessions, transaction
from queue_engine.apikeys import create_api_key
from tests.helpers import free_port, spawn, stop_process, wait_until, wait_until_serving


def children(pid):
    """The ids of the live processes whose parent is ``pid``."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


@pytest.fixture
def production_server(tmp_path, redis_server, cluster_database_url):
    """`queue-engine serve --workers 2` in cluster mode, on a Redis database no worker reads."""
    port = free_port()
    broker_url = redis_server.url.rsplit("/", 1)[0] + "/6"
    broker = redis.Redis.from_url(broker_url)
    broker.flushdb()
    env = {"QUEUE_ENGINE_BROKER_URL": broker_url, "QUEUE_ENGINE_DATABASE_URL": cluster_database_url,
           "QUEUE_ENGINE_DATA_DIR": str(tmp_path / "data")}
    log_path = tmp_path / "serve.log"
    process = spawn(["serve", "--port", str(port), "--workers", "2"], env, log_path)
    url = f"http://127.0.0.1:{port}"

    wait_until_serving(url, process, log_path, 60)
    yield process, url, broker, log_path
    stop_process(process)
    broker.close()


def test_serve_workers_runs_gunicorn_processes_and_answers(production_server, cluster_database_url):
    """Two web processes answer; a job is stored, put on its queue, read back, long-polled; SIGTERM stops all."""
    process, url, broker, log_path = production_server
    with transaction(make_sessions(cluster_database_url)) as session:
        key = create_api_key(session, f"prod-{free_port()}")
    auth = {"Authorization": f"Bearer {key.key}"}

    [master] = wait_until(lambda: children(process.pid), 10, "gunicorn's master process")
    wait_until(lambda: len(children(master)) == 2, 30, "two gunicorn worker processes")
    assert requests.get(url + "/readyz", timeout=10).status_code == 200

    created = requests.post(url + "/api/v1/jobs", json={"model": "tiny", "prompt": "Hello"}, headers=auth, timeout=10)
    assert created.status_code == 202, created.text
    job_id = created.json()["id"]
    for _ in range(4):  # several connections, so both processes are likely asked
        read = requests.get(f"{url}/api/v1/jobs/{job_id}", headers=auth, timeout=10)
        assert read.status_code == 200 and read.json()["status"] == "queued"
    waited = requests.get(f"{url}/api/v1/jobs/{job_id}?wait=0.3", headers=auth, timeout=10)
    assert waited.status_code == 200 and waited.json()["status"] == "queued"
    assert wait_until(lambda: broker.llen(keys.queue_name("tiny")) == 1, 10, "the job's message on its queue")

    workers = children(master)
    stop_process(process)
    assert process.returncode == 0, log_path.read_text()
    wait_until(lambda: not any(Path(f"/proc/{pid}").exists() for pid in [master, *workers]), 20,
               "gunicorn's processes to exit")
