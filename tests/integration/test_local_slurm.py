"""`slurm/local/start.sh` and `stop.sh`: a real one-node SLURM cluster with
fake GPUs, started and stopped by the project's own scripts."""

import os
import subprocess

import pytest

from tests.helpers import ROOT, free_port, wait_until

pytestmark = pytest.mark.integration

START, STOP = ROOT / "slurm" / "local" / "start.sh", ROOT / "slurm" / "local" / "stop.sh"
DAEMONS = ("slurmctld.pid", "slurmd.pid", "munge/munged.pid")


def run(*args, env=None, timeout=120):
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def running(pid):
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def daemon_pids(directory):
    return [int((directory / name).read_text()) for name in DAEMONS if (directory / name).exists()]


@pytest.fixture(scope="module")
def slurm(local_slurm):
    return local_slurm.directory, local_slurm.started


def job_state(env, job_id):
    shown = run("scontrol", "show", "job", job_id, env=env).stdout
    return next((part.split("=", 1)[1] for part in shown.split() if part.startswith("JobState=")), None)


def test_start_prints_slurm_conf_and_the_node_is_idle(slurm):
    directory, started = slurm
    assert started.stdout.strip() == f"export SLURM_CONF={directory}/slurm.conf"
    env = {"SLURM_CONF": str(directory / "slurm.conf")}
    assert run("sinfo", "-h", "-n", "localnode", "-o", "%T %c %G", env=env).stdout.split() == ["idle", "16", "gpu:4"]


def test_a_job_gets_fake_gpus_and_more_than_four_are_refused(slurm, tmp_path):
    directory, _ = slurm
    env = {"SLURM_CONF": str(directory / "slurm.conf")}
    out = tmp_path / "gpus.txt"
    submitted = run("sbatch", "--parsable", "--gres=gpu:2", f"--output={out}", "--wrap",
                    "echo $CUDA_VISIBLE_DEVICES", env=env)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().split(";")[0]
    wait_until(lambda: job_state(env, job_id) == "COMPLETED", 60, f"job {job_id} to complete", 0.2)
    assert out.read_text().strip() == "0,1"
    refused = run("sbatch", "--parsable", "--gres=gpu:5", "--wrap", "true", env=env)
    assert refused.returncode != 0 and refused.stderr.strip()


def test_start_again_leaves_the_running_cluster_alone(slurm):
    directory, _ = slurm
    before = daemon_pids(directory)
    again = run("bash", START, directory)
    assert again.returncode == 0, again.stderr
    assert daemon_pids(directory) == before and all(running(pid) for pid in before)


def test_stop_ends_every_daemon_and_stopping_twice_is_fine(tmp_path):
    ports = {"QE_SLURMCTLD_PORT": str(free_port()), "QE_SLURMD_PORT": str(free_port())}  # beside the module's
    started = run("bash", START, tmp_path / "c", env=ports)
    if started.returncode != 0:
        pytest.fail(started.stderr)
    pids = daemon_pids(tmp_path / "c")
    assert len(pids) == 3
    assert run("bash", STOP, tmp_path / "c").returncode == 0
    assert not any(running(pid) for pid in pids)
    assert run("bash", STOP, tmp_path / "c").returncode == 0
