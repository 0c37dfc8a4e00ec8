"""Scale-out end to end: `queue-engine autoscale` against a real one-node
SLURM cluster, its jobs running `queue-engine worker` with vLLM (CPU) on the
tiny model, Redis and PostgreSQL. No worker runs until work arrives."""

import io
import secrets
import signal
import threading
import time

import pytest
from sqlalchemy import select

from queue_engine.models import Job, ScalingState, WorkerAllocation
from slurm.jobscript import job_name
from tests.helpers import spawn, wait_until
from tests.integration.conftest import PATH_SETUP, Cluster

pytestmark = pytest.mark.integration

MAX_WORKERS = 2
IDLE_GRACE = 5
WORKER_START = 300  # two vLLM engines loading at once on two cores


class ScaleOut:
    """A cluster with a SLURM profile for `tiny`, and `queue-engine autoscale` as a process."""

    def __init__(self, directory, tiny_model_dir, redis_url, database_url, local_slurm):
        self.deployment = f"e2e{secrets.token_hex(3)}"
        # leader_ttl 3: an autoscaler SIGKILLed mid-test is succeeded by its restart within 3 s.
        config = (f'[autoscaler]\ndeployment = "{self.deployment}"\ninterval = 1\nidle_grace = {IDLE_GRACE}\n'
                  "backoff = 1\nleader_ttl = 3\n"
                  '[models.tiny.slurm]\ngpus = 1\ncpus = 2\nmem = "3G"\ntime = "00:30:00"\n'
                  f"max_workers = {MAX_WORKERS}\ntarget_backlog_per_worker = 64\nsetup = [\"{PATH_SETUP}\"]\n")
        self.cluster = Cluster(directory, tiny_model_dir, redis_url, database_url, config_toml=config,
                               lease_seconds=3)
        self.slurm = local_slurm.client()
        self.name = job_name(self.deployment, "tiny")
        self.env = {**self.cluster.env, **local_slurm.env}
        self.autoscaler = None
        self.most_jobs = 0
        self._sampling = threading.Event()

    def start_autoscaler(self):
        log_path = self.cluster.directory / "autoscale.log"
        self.autoscaler = spawn(["autoscale"], self.env, log_path)
        self.cluster.processes.append(self.autoscaler)
        return self.autoscaler

    def jobs(self):
        return self.slurm.jobs([self.name])

    def sample_queue(self):
        """Keep the most worker jobs ever seen in squeue at once in ``most_jobs``."""
        def sample():
            while not self._sampling.wait(0.2):
                self.most_jobs = max(self.most_jobs, len(self.jobs()))
        threading.Thread(target=sample, daemon=True).start()

    def allocations(self):
        with self.cluster.sessions() as session:
            return list(session.scalars(select(WorkerAllocation).where(
                WorkerAllocation.deployment == self.deployment).order_by(WorkerAllocation.id)))

    def decided_at(self):
        with self.cluster.sessions() as session:
            state = session.get(ScalingState, (self.deployment, "tiny"))
            return state and state.decided_at

    def stop(self):
        self._sampling.set()
        self.slurm.cancel([job.job_id for job in self.jobs()])
        self.cluster.stop()


@pytest.fixture
def scale_out(tmp_path, tiny_model_dir, redis_server, cluster_database_url, local_slurm):
    scale_out = ScaleOut(tmp_path, tiny_model_dir, redis_server.url, cluster_database_url, local_slurm)
    yield scale_out
    scale_out.stop()


def prompts_csv(rows):
    return io.BytesIO(("id,prompt\n" + "".join(f"{n},Tell me about the number {n}\n" for n in range(rows))).encode())


def rows_of(cluster, batch_id):
    with cluster.sessions() as session:
        return list(session.execute(select(Job.status, Job.attempts).where(Job.batch_id == batch_id)))


def test_a_batch_brings_workers_up_to_the_maximum_and_back_to_zero(scale_out):
    cluster = scale_out.cluster
    scale_out.start_autoscaler()
    wait_until(scale_out.decided_at, 30, "the autoscaler's first decision", 0.2)
    assert scale_out.jobs() == []  # nothing to do, no workers
    scale_out.sample_queue()
    client = cluster.new_client()
    batch = client.submit_batch(prompts_csv(600), "tiny", filename="prompts.csv", params={"max_tokens": 16})
    wait_until(scale_out.jobs, 10, "worker jobs in squeue", 0.1)

    batch = client.wait_for_batch(batch["id"], timeout=WORKER_START + 120)
    assert batch["status"] == "completed" and batch["request_counts"]["completed"] == 600
    rows = rows_of(cluster, batch["id"])
    assert len(rows) == 600 and set(rows) == {("succeeded", 1)}  # every row done, once

    def all_ended():
        return not scale_out.jobs() and all(a.ended_at for a in scale_out.allocations())

    wait_until(all_ended, IDLE_GRACE + 60, "every worker job to end after the idle grace", 0.2)
    assert scale_out.most_jobs == MAX_WORKERS
    ended = scale_out.allocations()
    assert len(ended) == MAX_WORKERS
    for allocation in ended:
        assert allocation.serving_at is not None and allocation.node == "localnode"
        # A warm shutdown: told to stop (SIGTERM), the worker finished and exited 0.
        assert allocation.stop_requested_at is not None and allocation.state == "completed", allocation.exit_reason
        log = cluster.settings.data_dir / "slurm" / f"{scale_out.name}-{allocation.slurm_job_id}.out"
        assert f"serving in SLURM job {allocation.slurm_job_id}" in log.read_text()


def test_a_restarted_autoscaler_adopts_its_workers_and_a_cancelled_worker_is_replaced(scale_out):
    cluster = scale_out.cluster
    first = scale_out.start_autoscaler()
    scale_out.sample_queue()
    client = cluster.new_client()
    batch = client.submit_batch(prompts_csv(3000), "tiny", filename="prompts.csv", params={"max_tokens": 64})

    def serving():
        return [a for a in scale_out.allocations() if a.state == "serving"]

    wait_until(lambda: len(serving()) == MAX_WORKERS, WORKER_START, "both workers to serve", 0.5)
    before = {a.slurm_job_id for a in scale_out.allocations()}

    first.send_signal(signal.SIGKILL)  # no chance to tidy up
    first.wait(10)
    restarted_at = time.time()
    scale_out.start_autoscaler()
    wait_until(lambda: scale_out.decided_at().timestamp() > restarted_at + 2, 60, "decisions after the restart", 0.2)
    assert {a.slurm_job_id for a in scale_out.allocations()} == before  # adopted, nothing added
    assert {job.job_id for job in scale_out.jobs()} == before

    victim = serving()[0]
    assert client.get_batch(batch["id"])["status"] == "in_progress"
    scale_out.slurm.cancel([victim.slurm_job_id], signal="KILL")  # the worker dies at once, holding rows
    wait_until(lambda: len(scale_out.allocations()) > MAX_WORKERS, 30, "a replacement worker job", 0.2)
    replacement = scale_out.allocations()[-1]
    assert replacement.slurm_job_id not in before

    batch = client.wait_for_batch(batch["id"], timeout=WORKER_START + 300)
    assert batch["status"] == "completed" and batch["request_counts"]["completed"] == 3000
    rows = rows_of(cluster, batch["id"])
    assert {status for status, _ in rows} == {"succeeded"}
    assert any(attempts == 2 for _, attempts in rows)  # the victim's rows ran again elsewhere
    assert scale_out.most_jobs <= MAX_WORKERS
    victim = next(a for a in scale_out.allocations() if a.slurm_job_id == victim.slurm_job_id)
    assert victim.ended_at is not None and victim.state in ("cancelled", "failed")
