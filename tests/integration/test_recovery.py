"""A worker killed with SIGKILL mid-run loses no job and no batch row: once its
leases expire the dispatcher puts its work back in the queue, a new worker
runs it, and everything ends succeeded, each run to completion exactly once."""

import io
import os
import signal

import pytest
from sqlalchemy import select

from queue_engine.models import Job

from tests.helpers import wait_until
from tests.integration.conftest import Cluster

pytestmark = pytest.mark.integration

JOBS = 24


@pytest.fixture
def fragile_cluster(tmp_path, tiny_model_dir, redis_server, cluster_database_url):
    """A short lease, so a dead worker's jobs come back in seconds (the broker's
    visibility timeout stays an hour: recovery does not wait for it)."""
    cluster = Cluster(tmp_path, tiny_model_dir, redis_server.url, cluster_database_url, lease_seconds=2)
    yield cluster
    cluster.stop()


def test_sigkilled_worker_loses_no_job(fragile_cluster):
    """Jobs running on a killed worker are taken over by the next one and finish once."""
    first = fragile_cluster.start_worker()
    client = fragile_cluster.new_client()
    jobs = [client.submit_job({"model": "tiny", "prompt": f"Tell me about {i}",
                               "params": {"max_tokens": 400, "temperature": 0}}) for i in range(JOBS)]
    running = wait_until(
        lambda: [j for j in (client.get_job(job["id"]) for job in jobs) if j["status"] == "running"],
        60, "jobs to be running on the first worker")
    owners_at_kill = lease_owners(fragile_cluster, [job["id"] for job in running])
    os.kill(first.process.pid, signal.SIGKILL)
    first.process.wait(10)

    second = fragile_cluster.start_worker(wait=False)
    finished = [client.wait_for_job(job["id"], timeout=240) for job in jobs]

    assert [job["status"] for job in finished] == ["succeeded"] * JOBS
    assert all(job["result"]["text"] for job in finished)
    attempts = {job["id"]: job["attempts"] for job in finished}
    assert set(attempts.values()) <= {1, 2}, "no job was started more than twice"
    assert all(attempts[job["id"]] == 2 for job in running), "jobs running at the kill were taken over"

    owners = lease_owners(fragile_cluster, [job["id"] for job in jobs])
    dead_worker = set(owners_at_kill.values()) - {None}
    assert len(dead_worker) == 1
    completed_by_second = [job_id for job_id, owner in owners.items() if owner not in dead_worker]
    assert completed_by_second, "the second worker finished the dead worker's jobs"
    # Exactly once: the second worker's engine finished one request per job it completed, no more.
    assert second.metric("qe_engine_requests_total", outcome="finished") == len(completed_by_second)


def lease_owners(cluster, job_ids):
    """Which worker completed each job (the lease owner is kept after success)."""
    with cluster.sessions() as session:
        return dict(session.execute(select(Job.id, Job.lease_owner).where(Job.id.in_(job_ids))).all())


def test_a_chunk_held_by_a_sigkilled_worker_comes_back_and_every_row_ends_once(fragile_cluster):
    """The dead worker's unacknowledged chunks are redelivered; the next worker
    runs only the rows that had not finished, each exactly once."""
    first = fragile_cluster.start_worker()
    client = fragile_cluster.new_client()
    data = io.BytesIO(("prompt\n" + "".join(f"Tell me a long story about {i}\n" for i in range(600))).encode())
    batch = client.submit_batch(data, "tiny", filename="stories.csv", params={"max_tokens": 48, "temperature": 0})
    wait_until(lambda: client.get_batch(batch["id"])["request_counts"]["completed"] > 0 and
               batch_rows(fragile_cluster, batch["id"], Job.status == "running"),
               60, "rows to finish and others to be running on the first worker")
    os.kill(first.process.pid, signal.SIGKILL)
    first.process.wait(10)
    dead = {owner for _, owner in batch_rows(fragile_cluster, batch["id"], Job.status == "running")}

    second = fragile_cluster.start_worker(wait=False)
    done = client.wait_for_batch(batch["id"], timeout=300)

    assert done["status"] == "completed"
    assert done["request_counts"] == {"total": 600, "completed": 600, "failed": 0, "cancelled": 0}
    rows = batch_rows(fragile_cluster, batch["id"])
    assert len(dead) == 1
    by_second = [job_id for job_id, owner in rows if owner not in dead]
    assert 0 < len(by_second) < 600, "the first worker's finished rows were kept, the rest run by the second"
    assert second.metric("qe_engine_requests_total", outcome="finished") == len(by_second)


def batch_rows(cluster, batch_id, *where):
    """``(job id, lease owner)`` of a batch's rows; the owner is kept after success."""
    with cluster.sessions() as session:
        return session.execute(select(Job.id, Job.lease_owner).where(Job.batch_id == batch_id, *where)).all()
