"""A worker killed with SIGKILL mid-run loses no job: after a new worker
starts, every job ends succeeded, each run to completion exactly once."""

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
    """Short lease and visibility timeout, so a dead worker's jobs come back in seconds."""
    cluster = Cluster(tmp_path, tiny_model_dir, redis_server.url, cluster_database_url,
                      lease_seconds=2, visibility_timeout=4)
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
    assert second.metrics()['qe_engine_requests_total{outcome="finished"}'] == len(completed_by_second)


def lease_owners(cluster, job_ids):
    """Which worker completed each job (the lease owner is kept after success)."""
    with cluster.sessions() as session:
        return dict(session.execute(select(Job.id, Job.lease_owner).where(Job.id.in_(job_ids))).all())
