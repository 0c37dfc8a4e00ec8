"""The command line: exit codes and output."""

import json

import pytest
from click.testing import CliRunner
from sqlalchemy import select

from queue_engine.apikeys import hash_key
from queue_engine.cli import main
from queue_engine.db import make_engine
from queue_engine.models import ApiKey


@pytest.fixture
def env(tmp_path):
    return {"QUEUE_ENGINE_DATA_DIR": str(tmp_path), "QUEUE_ENGINE_DATABASE_URL": f"sqlite:///{tmp_path}/cli.db",
            "QUEUE_ENGINE_CONFIG": ""}


def test_keys_create_json_prints_key_once_and_stores_only_a_hash(env):
    """`keys create NAME --json` prints {name, key, webhook_secret}; the database holds only the hash."""
    result = CliRunner().invoke(main, ["keys", "create", "alice", "--json"], env=env)
    assert result.exit_code == 0, result.output
    created = json.loads(result.output.strip().splitlines()[-1])
    assert set(created) == {"name", "key", "webhook_secret"} and created["name"] == "alice"
    assert created["webhook_secret"].startswith("whsec_")
    engine = make_engine(env["QUEUE_ENGINE_DATABASE_URL"])
    with engine.connect() as connection:
        stored = connection.execute(select(ApiKey.key_hash)).scalars().all()
    assert stored == [hash_key(created["key"])]


def test_keys_create_duplicate_name_fails_clearly(env):
    """A second key with the same name exits non-zero and says why."""
    runner = CliRunner()
    assert runner.invoke(main, ["keys", "create", "bob"], env=env).exit_code == 0
    result = runner.invoke(main, ["keys", "create", "bob"], env=env)
    assert result.exit_code == 1 and "already exists" in result.output


def test_db_upgrade_is_idempotent(env):
    """`db upgrade` can run twice."""
    runner = CliRunner()
    for _ in range(2):
        result = runner.invoke(main, ["db", "upgrade"], env=env)
        assert result.exit_code == 0 and "up to date" in result.output


def test_worker_with_unknown_model_exits_with_the_configured_names(env):
    """`worker --model X` for an unknown profile fails before loading anything."""
    result = CliRunner().invoke(main, ["worker", "--model", "nope"], env=env)
    assert result.exit_code == 1 and "configured: tiny" in result.output


def test_every_command_has_help():
    """`--help` works on each command of the contract."""
    for command in (["serve"], ["worker"], ["submit"], ["status"], ["results"], ["keys", "create"], ["db", "upgrade"],
                    ["models", "build-tiny"], ["demo"]):
        result = CliRunner().invoke(main, [*command, "--help"])
        assert result.exit_code == 0 and "Usage:" in result.output


@pytest.mark.parametrize("with_file, with_prompt", [(True, True), (False, False)])
def test_submit_takes_a_file_or_a_prompt(tmp_path, with_file, with_prompt):
    """`submit` runs FILE as a batch or --prompt as a job: exactly one of them."""
    source = tmp_path / "rows.csv"
    source.write_text("prompt\nx\n")
    args = ([str(source)] if with_file else []) + (["--prompt", "hi"] if with_prompt else [])
    result = CliRunner().invoke(main, ["submit", *args, "--key", "k"], env={})
    assert result.exit_code == 2 and "give a FILE" in result.output


def test_keys_rotate_secret_prints_the_new_secret_and_keeps_the_old_for_the_grace(env):
    """`keys rotate-secret NAME` replaces the webhook secret; the old one is kept to sign during the grace."""
    runner = CliRunner()
    created = json.loads(runner.invoke(main, ["keys", "create", "carol", "--json"], env=env).output.splitlines()[-1])
    result = runner.invoke(main, ["keys", "rotate-secret", "carol", "--grace-hours", "2", "--json"], env=env)
    assert result.exit_code == 0, result.output
    rotated = json.loads(result.output.strip().splitlines()[-1])
    assert rotated["webhook_secret"].startswith("whsec_") and rotated["webhook_secret"] != created["webhook_secret"]
    engine = make_engine(env["QUEUE_ENGINE_DATABASE_URL"])
    with engine.connect() as connection:
        row = connection.execute(select(ApiKey.webhook_secret, ApiKey.previous_webhook_secret)).one()
    assert tuple(row) == (rotated["webhook_secret"], created["webhook_secret"])
    missing = runner.invoke(main, ["keys", "rotate-secret", "nobody"], env=env)
    assert missing.exit_code == 1 and "no key named 'nobody'" in missing.output


def test_slurm_script_prints_the_job_script_of_a_profile(env, tmp_path):
    config = tmp_path / "qe.toml"
    config.write_text('[models.big]\npath = "/models/big"\n[models.big.slurm]\ngpus = 2\n'
                      'setup = ["source /shared/venv/bin/activate"]\n')
    result = CliRunner().invoke(main, ["slurm-script", "--model", "big"], env={**env, "QUEUE_ENGINE_CONFIG": str(config)})
    assert result.exit_code == 0, result.output
    assert result.output.startswith("#!/bin/bash\n#SBATCH --job-name=qe-main-big\n")
    assert "#SBATCH --gres=gpu:2\n" in result.output
    assert result.output.endswith("source /shared/venv/bin/activate\n\nexec queue-engine worker --model big\n")


@pytest.mark.parametrize("model, message", [("nope", "no model profile 'nope'"), ("tiny", "has no [models.tiny.slurm]")])
def test_slurm_script_refuses_a_profile_it_cannot_render(env, model, message):
    result = CliRunner().invoke(main, ["slurm-script", "--model", model], env=env)
    assert result.exit_code == 1 and message in result.output


def test_autoscale_needs_cluster_mode_and_a_slurm_profile(env):
    embedded = CliRunner().invoke(main, ["autoscale", "--once"], env=env)
    assert embedded.exit_code == 1 and "needs a broker" in embedded.output
    nothing = CliRunner().invoke(main, ["autoscale", "--once"], env={**env, "QUEUE_ENGINE_BROKER_URL": "redis://127.0.0.1:1/0"})
    assert nothing.exit_code == 1 and "no model profile has a [models.X.slurm] table" in nothing.output
