"""The autoscaler against a real slurmctld/slurmd, real Redis and the
database: what it submits, adopts and backs off from, two autoscalers on one
deployment (one leads, the other takes over), and a worker that does not
stop being killed. Its jobs here never load an engine (their setup sleeps or
fails), so the tests are about SLURM and the policy; `test_scale_out.py`
runs real workers end to end."""

import logging
import re
import secrets
import signal
import threading
from datetime import timedelta

import pytest
from sqlalchemy import select

from queue_engine import allocations, leadership
from queue_engine.db import transaction
from queue_engine.models import LeaderLease, ScalingState, WorkerAllocation, utcnow
from slurm.autoscaler import Autoscaler
from slurm.commands import Slurm, SlurmError
from slurm.jobscript import job_name, render
from tests.helpers import spawn, wait_until
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
    client = cluster.new_client(operator=True)  # it reads /api/v1/models too
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
    scaling = cluster.new_client(operator=True).models()["blind"]["scaling"]
    assert scaling["action"] == "wait" and scaling["reason"].startswith("cannot read SLURM's queue: squeue")
    with transaction(cluster.sessions) as session:
        assert allocations.active(session, scaler.deployment, "blind") == []


def test_a_refused_submission_counts_as_a_failed_start_with_slurms_reason(scaled):
    cluster, scaler = scaled("greedy", SLEEPING + "gpus = 5\n")  # the node has 4
    submit_jobs(cluster, "greedy", 1)
    scaler.step()
    assert allocations_of(cluster, "greedy") == []
    scaling = cluster.new_client(operator=True).models()["greedy"]["scaling"]
    assert (scaling["state"], scaling["failures"]) == ("backoff", 1)
    assert "sbatch --parsable failed" in scaling["last_failure"]
    assert "Requested node configuration is not available" in scaling["last_failure"]


def start_autoscaler(cluster, local_slurm, name):
    """A `queue-engine autoscale` process for the cluster's deployment; stopped with the cluster."""
    log_path = cluster.directory / f"autoscale-{name}.log"
    process = spawn(["autoscale"], {**cluster.env, **local_slurm.env}, log_path)
    cluster.processes.append(process)
    return process, log_path


def lease_of(cluster):
    with cluster.sessions() as session:
        return session.get(LeaderLease, leadership.autoscaler_lease(cluster.settings.autoscaler.deployment))


def holder_pid(lease):
    return None if lease is None else int(lease.holder.split(":")[-2])


def decided_at(cluster, model):
    with cluster.sessions() as session:
        state = session.get(ScalingState, (cluster.settings.autoscaler.deployment, model))
        return None if state is None else state.decided_at


def submitted_in(log_path):
    """The job ids an autoscaler's log says it submitted or adopted."""
    return re.findall(r"(?:submitted worker job|adopting SLURM job) (\d+)", log_path.read_text())


def decisions_in(log_path, model):
    """The lines of an autoscaler's log in which it decided or acted for ``model``."""
    return [line for line in log_path.read_text().splitlines() if f" {model}: " in line]


def deployment_jobs(scaler):
    return {job.job_id: job.state for job in scaler.slurm.jobs(list(scaler.job_names))}


def test_two_autoscalers_on_one_deployment_one_acts_and_the_other_takes_over_when_it_is_killed(scaled, local_slurm):
    """Exactly the wanted jobs, all submitted by the leader; after SIGKILL the standby leads within
    leader_ttl and a few intervals, submits what more is wanted, and cancels none of the first's jobs."""
    cluster, scaler = scaled("duo", SLEEPING + "gpus = 0\nmax_workers = 3\n", leader_ttl=2)
    submit_jobs(cluster, "duo", 2)  # wants 2 workers
    contenders = dict(start_autoscaler(cluster, local_slurm, name) for name in ("a", "b"))
    wait_until(lambda: len(allocations_of(cluster, "duo")) == 2 and lease_of(cluster), 30, "two jobs submitted")
    lease = lease_of(cluster)
    [leader] = [p for p in contenders if p.pid == holder_pid(lease)]
    [standby] = [p for p in contenders if p is not leader]
    first_decision = decided_at(cluster, "duo")
    wait_until(lambda: decided_at(cluster, "duo") > first_decision + timedelta(seconds=1), 30,
               "the leader to decide for a second more")  # five more rounds at interval 0.2
    rows = allocations_of(cluster, "duo")
    assert len(rows) == 2 and sorted(deployment_jobs(scaler)) == sorted(row.slurm_job_id for row in rows)
    assert sorted(submitted_in(contenders[leader])) == sorted(row.slurm_job_id for row in rows)
    assert decisions_in(contenders[standby], "duo") == []  # it did not even decide
    assert f"standing by: {lease.holder} leads deployment" in contenders[standby].read_text()

    leader.send_signal(signal.SIGKILL)  # it cannot release its lease
    leader.wait(10)
    killed_at = utcnow()
    submit_jobs(cluster, "duo", 1)  # now wants 3
    wait_until(lambda: len(allocations_of(cluster, "duo")) == 3, 30, "the standby to take over and submit one more")
    new_lease = lease_of(cluster)
    assert holder_pid(new_lease) == standby.pid
    assert new_lease.acquired_at - killed_at < timedelta(seconds=2 + 2)  # leader_ttl, and a little
    assert decided_at(cluster, "duo") > killed_at  # its standing advances
    first_two, [third] = rows, allocations_of(cluster, "duo")[2:]
    assert submitted_in(contenders[standby]) == [third.slurm_job_id]
    queue = deployment_jobs(scaler)
    assert sorted(queue) == sorted([row.slurm_job_id for row in first_two] + [third.slurm_job_id])
    assert all(queue[row.slurm_job_id] in ("PENDING", "RUNNING") for row in first_two)
    assert all(row.ended_at is None for row in allocations_of(cluster, "duo"))


def test_an_autoscaler_stopped_cleanly_hands_over_at_once(scaled, local_slurm):
    """SIGTERM: the leader releases its lease and exits 0; the standby leads at its next try, long
    before leader_ttl, and submits nothing the leader had submitted."""
    cluster, scaler = scaled("handover", SLEEPING + "gpus = 0\nmax_workers = 2\n", leader_ttl=60)
    submit_jobs(cluster, "handover", 1)
    first, first_log = start_autoscaler(cluster, local_slurm, "first")
    wait_until(lambda: holder_pid(lease_of(cluster)) == first.pid and allocations_of(cluster, "handover"), 30,
               "the first autoscaler to lead and submit")
    second, second_log = start_autoscaler(cluster, local_slurm, "second")
    wait_until(lambda: "standing by" in second_log.read_text(), 30, "the second autoscaler to stand by")
    first.send_signal(signal.SIGTERM)
    assert first.wait(10) == 0
    stopped_at = utcnow()
    assert "released the lease" in first_log.read_text()
    wait_until(lambda: holder_pid(lease_of(cluster)) == second.pid, 10, "the second autoscaler to lead")
    assert lease_of(cluster).acquired_at - stopped_at < timedelta(seconds=2)  # not the 60 s of leader_ttl
    wait_until(lambda: decided_at(cluster, "handover") > stopped_at + timedelta(seconds=0.5), 30,
               "the second autoscaler to decide a few times")
    [row] = allocations_of(cluster, "handover")
    assert list(deployment_jobs(scaler)) == [row.slurm_job_id] and submitted_in(second_log) == []


def test_a_worker_that_ignores_the_stop_signal_is_killed_after_stop_grace(scaled, caplog):
    """Told to stop (scancel --batch --signal=TERM) by a scale-in, its job traps TERM and runs on;
    after stop_grace the autoscaler cancels it through SLURM once, and closes it as killed, not as
    a failed start."""
    caplog.set_level(logging.INFO, logger="slurm.autoscaler")
    cluster, scaler = scaled("deaf", 'gpus = 0\ncpus = 1\nmem = "100M"\ntime = "00:10:00"\nmax_workers = 1\n'
                                     "target_backlog_per_worker = 1\n"
                                     "setup = [\"trap '' TERM\", \"sleep 600\"]\n",
                             idle_grace=0, stop_grace=1)
    client = cluster.new_client(operator=True)
    job = client.submit_job({"model": "deaf", "prompt": "x"})

    def stepped(predicate):
        return lambda: (scaler.step(), predicate(allocations_of(cluster, "deaf")))[1]

    wait_until(stepped(lambda rows: rows and rows[0].state == "starting"), 30, "the job to run")
    [row] = allocations_of(cluster, "deaf")
    with transaction(cluster.sessions) as session:  # what its worker would do once its engine is loaded
        assert allocations.register_worker(session, scaler.deployment, row.slurm_job_id, node=row.node)
    client.cancel_job(job["id"])  # the backlog is zero: a scale-in with idle_grace 0
    wait_until(stepped(lambda rows: rows[0].kill_requested_at is not None), 30, "the autoscaler to kill the job")
    [row] = allocations_of(cluster, "deaf")
    assert row.kill_requested_at - row.stop_requested_at >= timedelta(seconds=1)
    assert row.slurm_job_id in deployment_jobs(scaler)  # the TERM was ignored: still there when killed
    wait_until(stepped(lambda rows: rows[0].ended_at is not None), 30, "the killed job to end")
    [row] = allocations_of(cluster, "deaf")
    assert row.state == "cancelled" and "(exit 0:9)" in row.exit_reason
    assert re.match(r"killed after not stopping within \d+ s of the stop request; CANCELLED", row.exit_reason)
    kills = [r for r in caplog.records if r.levelno == logging.WARNING and "killed it" in r.getMessage()]
    assert [r.getMessage().split()[3] for r in kills] == [row.slurm_job_id]  # once, though it lingered a while
    scaling = client.models()["deaf"]["scaling"]
    assert (scaling["state"], scaling["failures"]) == ("ok", 0)
