"""The autoscaler against a real slurmctld/slurmd, real Redis and the
database: what it submits, adopts and backs off from. Its jobs here never
load an engine (their setup sleeps or fails), so the tests are about SLURM
and the policy; `test_scale_out.py` runs real workers end to end."""

import secrets
import threading

import pytest
from sqlalchemy import select

from queue_engine import allocations
from queue_engine.db import transaction
from queue_engine.models import WorkerAllocation
from slurm.autoscaler import Autoscaler
from slurm.commands import Slurm, SlurmError
from slurm.jobscript import job_name, render
from tests.helpers import wait_until
from tests.integration.conftest import Cluster

pytestmark = pytest.mark.integration


@pytest.fixture
def scaled(tmp_path, tiny_model_dir, redis_server, cluster_database_url, local_slurm):
    """Build a cluster whose config adds ``profile`` (a TOML [models.X] table
    with a slurm table) and an autoscaler for it; cancel its jobs at the end."""
    made = []

    def make(model, slurm_toml, **autoscaler):
        deployment = f"t{secrets.token_hex(3)}"
        options = {"interval": 0.2, "idle_grace": 600, "backoff": 1, "max_backoff": 30, **autoscaler}
        config = (f'[autoscaler]\ndeployment = "{deployment}"\n'
                  + "".join(f"{k} = {v}\n" for k, v in options.items())
                  + f'[models.{model}]\npath = "{{tiny}}"\n[models.{model}.slurm]\n{slurm_toml}')
        cluster = Cluster(tmp_path, tiny_model_dir, redis_server.url, cluster_database_url, config_toml=config)
        scaler = Autoscaler(cluster.settings, cluster.sessions, local_slurm.client())
        made.append((cluster, list(scaler.job_names)))
        return cluster, scaler

    yield make
    slurm = local_slurm.client()
    for cluster, names in made:
        slurm.cancel([job.job_id for job in slurm.jobs(names)])
        cluster.stop()


def allocations_of(cluster, model):
    with cluster.sessions() as session:
        return list(session.scalars(select(WorkerAllocation).where(
            WorkerAllocation.deployment == cluster.settings.autoscaler.deployment, WorkerAllocation.model == model,
        ).order_by(WorkerAllocation.id)))


def submit_jobs(cluster, model, count):
    client = cluster.new_client()
    for _ in range(count):
        client.submit_job({"model": model, "prompt": "x"})
    return client


SLEEPING = 'cpus = 1\nmem = "100M"\ntime = "00:10:00"\nsetup = ["sleep 600"]\ntarget_backlog_per_worker = 1\n'


def test_a_two_gpu_profile_packs_at_most_two_workers_on_the_four_gpu_node(scaled):
    cluster, scaler = scaled("packed", SLEEPING + "gpus = 2\nmax_workers = 4\n")
    submit_jobs(cluster, "packed", 4)
    scaler.step()
    assert len(allocations_of(cluster, "packed")) == 4  # all at once: desired = 4

    def two_started():
        scaler.step()
        states = sorted(a.state for a in allocations_of(cluster, "packed"))
        return states == ["pending", "pending", "starting", "starting"]

    wait_until(two_started, 30, "two jobs running and two pending")
    queue = scaler.slurm.jobs([job_name(scaler.deployment, "packed")])
    assert sorted(job.state for job in queue) == ["PENDING", "PENDING", "RUNNING", "RUNNING"]
    assert {job.reason for job in queue if job.state == "PENDING"} <= {"Resources", "Priority"}  # waiting for GPUs
    scaler.step()
    assert len(allocations_of(cluster, "packed")) == 4  # pending jobs count: nothing more submitted


def test_jobs_of_the_deployment_found_in_squeue_are_adopted_not_duplicated(scaled):
    cluster, scaler = scaled("adopt", SLEEPING + "gpus = 1\nmax_workers = 2\n")
    script = render(cluster.settings, "adopt")
    (cluster.settings.data_dir / "slurm").mkdir(parents=True)  # where the jobs write their output
    left_behind = scaler.slurm.submit(script)  # as a predecessor that died before recording it
    foreign = scaler.slurm.submit(script.replace(f"queue-engine:{scaler.deployment}:adopt", "someone-else"))
    submit_jobs(cluster, "adopt", 2)
    scaler.step()
    rows = allocations_of(cluster, "adopt")
    assert [(row.slurm_job_id, row.adopted) for row in rows][0] == (left_behind, True), [(r.slurm_job_id, r.adopted, r.state) for r in rows]
    assert len(rows) == 2 and not rows[1].adopted and foreign not in {row.slurm_job_id for row in rows}
    scaler.step()
    assert len(allocations_of(cluster, "adopt")) == 2
    scaler.slurm.cancel([foreign])


def test_a_failing_setup_backs_off_into_the_error_state_instead_of_a_storm(scaled):
    cluster, scaler = scaled(
        "broken", 'gpus = 1\ncpus = 1\nmem = "100M"\ntime = "00:10:00"\nmax_workers = 2\n'
                  "target_backlog_per_worker = 1\n"
                  'setup = ["echo \'module: cuda/12.4 not found\' >&2", "false"]\n',
        backoff=1, error_after=3)
    client = submit_jobs(cluster, "broken", 2)
    stop = threading.Event()
    thread = threading.Thread(target=scaler.run, args=(stop,), daemon=True)
    thread.start()
    try:
        def in_error_state():
            if (client.models()["broken"]["scaling"] or {}).get("state") == "error":
                stop.set()
                return True
        wait_until(in_error_state, 60, "the profile to reach the error state", 0.05)
    finally:
        stop.set()
        thread.join(30)
    rows = allocations_of(cluster, "broken")
    # Two at first (desired 2), then one probe after the back-off; the third failure is the error.
    assert len(rows) == 3 and {row.state for row in rows} == {"failed"}
    assert rows[2].submitted_at >= max(rows[0].ended_at, rows[1].ended_at)
    scaling = client.models()["broken"]["scaling"]
    assert scaling["failures"] == 3 and "FAILED (exit 1:0)" in scaling["last_failure"]
    assert scaling["action"] == "wait" and "backing off after 3 failed starts" in scaling["reason"]
    output = cluster.settings.data_dir / "slurm" / f"{job_name(scaler.deployment, 'broken')}-{rows[0].slurm_job_id}.out"
    assert "module: cuda/12.4 not found" in output.read_text()


def test_when_slurm_cannot_be_read_the_models_list_says_so(scaled, local_slurm):
    cluster, scaler = scaled("blind", SLEEPING + "gpus = 1\n")
    scaler.slurm = Slurm(timeout=5, env={"SLURM_CONF": "/nonexistent/slurm.conf"})
    with pytest.raises(SlurmError, match="squeue"):
        scaler.step()
    scaling = cluster.new_client().models()["blind"]["scaling"]
    assert scaling["action"] == "wait" and scaling["reason"].startswith("cannot read SLURM's queue: squeue")
    with transaction(cluster.sessions) as session:
        assert allocations.active(session, scaler.deployment, "blind") == []


def test_a_refused_submission_counts_as_a_failed_start_with_slurms_reason(scaled):
    cluster, scaler = scaled("greedy", SLEEPING + "gpus = 5\n")  # the node has 4
    submit_jobs(cluster, "greedy", 1)
    scaler.step()
    assert allocations_of(cluster, "greedy") == []
    scaling = cluster.new_client().models()["greedy"]["scaling"]
    assert (scaling["state"], scaling["failures"]) == ("backoff", 1)
    assert "sbatch --parsable failed" in scaling["last_failure"]
    assert "Requested node configuration is not available" in scaling["last_failure"]
