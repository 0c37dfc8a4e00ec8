"""The SLURM client against a real slurmctld/slurmd: submit, find our jobs,
signal and cancel them, learn how they ended; every failure is an error that
carries SLURM's own words."""

import pytest

from queue_engine.settings import load_settings
from slurm.commands import SlurmError, state_kind
from slurm.jobscript import render
from tests.helpers import wait_until

pytestmark = pytest.mark.integration

NAME = "qe-test-commands"


def script(body, name=NAME, comment="queue-engine:test:commands", output="/dev/null"):
    return (f"#!/bin/bash\n#SBATCH --job-name={name}\n#SBATCH --comment={comment}\n"
            f"#SBATCH --output={output}\n{body}\n")


def ended(slurm, job_id):
    return wait_until(lambda: slurm.ended(job_id) if not any(j.job_id == job_id for j in slurm.jobs([NAME])) else None,
                      30, f"job {job_id} to leave the queue", 0.1)


def test_a_submitted_job_is_found_by_name_with_its_comment(local_slurm):
    slurm = local_slurm.client()
    job_id = slurm.submit(script("sleep 60"))
    try:
        [job] = [j for j in slurm.jobs([NAME, "qe-test-other"]) if j.job_id == job_id]
        assert (job.name, job.comment) == (NAME, "queue-engine:test:commands")
        assert job.kind in ("pending", "running") and job.active
        assert slurm.jobs(["qe-test-other"]) == []
    finally:
        slurm.cancel([job_id])
    job = ended(slurm, job_id)
    assert (job.state, job.kind) == ("CANCELLED", "cancelled")


def test_how_a_job_ended_is_read_after_it_left_the_queue(local_slurm):
    slurm = local_slurm.client()
    done, failed = slurm.submit(script("true")), slurm.submit(script("exit 42"))
    assert (ended(slurm, done).kind, ended(slurm, done).exit_code) == ("completed", "0:0")
    failure = ended(slurm, failed)
    assert (failure.state, failure.kind, failure.exit_code) == ("FAILED", "failed", "42:0")


def test_the_job_completion_log_answers_when_scontrol_no_longer_knows_the_job(local_slurm):
    slurm = local_slurm.client()
    job_id = slurm.submit(script("exit 3"))
    ended(slurm, job_id)
    job = slurm._sacct_completions(job_id)  # what ended() falls back to after MinJobAge
    assert (job.state, job.exit_code) == ("FAILED", "3:0")


def test_a_signal_reaches_the_batch_script_itself(local_slurm, tmp_path):
    """A worker runs as the batch script (exec), so scancel --signal must reach it."""
    slurm = local_slurm.client()
    out = tmp_path / "trap.out"
    job_id = slurm.submit(script("trap 'echo got TERM; exit 0' TERM\necho started\nwhile true; do sleep 0.1; done",
                                 output=out))
    wait_until(lambda: out.exists() and "started" in out.read_text(), 30, "the job to start", 0.1)
    slurm.cancel([job_id], signal="TERM")
    job = ended(slurm, job_id)
    assert "got TERM" in out.read_text()
    assert job.kind == "completed"  # it chose to exit 0


def test_signalling_a_job_that_already_ended_is_not_an_error(local_slurm):
    slurm = local_slurm.client()
    job_id = slurm.submit(script("true"))
    ended(slurm, job_id)
    slurm.cancel([job_id], signal="TERM")
    slurm.cancel([job_id])


def test_a_refused_submission_raises_with_slurms_reason(local_slurm):
    with pytest.raises(SlurmError, match="sbatch --parsable failed.*Requested node configuration is not available"):
        local_slurm.client().submit(script("true").replace("#!/bin/bash\n", "#!/bin/bash\n#SBATCH --gres=gpu:5\n"))


def test_a_command_that_does_not_answer_in_time_is_an_error(local_slurm):
    with pytest.raises(SlurmError, match="did not answer within"):
        local_slurm.client(timeout=0.0001).jobs([NAME])


def test_a_missing_command_is_an_error(local_slurm):
    slurm = local_slurm.client(env={"PATH": "/nonexistent"})
    with pytest.raises(SlurmError, match="sbatch is not installed"):
        slurm.submit(script("true"))


def test_a_rendered_worker_script_passes_sbatch_test_only(local_slurm, tmp_path):
    settings = load_settings(environ={}, data_dir=tmp_path, models={"tiny-gpu": {"path": "tiny", "slurm": {
        "gpus": 2, "cpus": 4, "mem": "2G", "time": "00:30:00", "partition": "debug", "extra": ["--exclusive"],
        "setup": ["source /opt/venv/bin/activate"]}}})
    answer = local_slurm.client().test_submit(render(settings, "tiny-gpu"))
    assert "to start at" in answer and "localnode" in answer


@pytest.mark.parametrize("state, kind", [
    ("PENDING", "pending"), ("CONFIGURING", "pending"), ("RUNNING", "running"), ("COMPLETING", "running"),
    ("COMPLETED", "completed"), ("FAILED", "failed"), ("NODE_FAIL", "failed"), ("OUT_OF_MEMORY", "failed"),
    ("BOOT_FAIL", "failed"), ("TIMEOUT", "timeout"), ("PREEMPTED", "timeout"), ("CANCELLED by 0", "cancelled"),
    ("", "unknown"),
])
def test_slurm_states_are_sorted_into_kinds_as_parsl_does(state, kind):
    assert state_kind(state) == kind
