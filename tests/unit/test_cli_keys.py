"""``queue-engine keys``: create (operator or not), set-limits, show and
revoke, through click's CliRunner on a SQLite database of the test's own."""

import json
from datetime import date

import pytest
from click.testing import CliRunner
from sqlalchemy import select

from queue_engine.cli import main
from queue_engine.db import make_sessions, transaction
from queue_engine.jobs import create_job, estimate_tokens
from queue_engine.models import ApiKey, Job, UsageDaily, utcnow
from queue_engine.schemas import JobCreate
from queue_engine.settings import load_settings


@pytest.fixture
def env(tmp_path):
    return {"QUEUE_ENGINE_DATA_DIR": str(tmp_path), "QUEUE_ENGINE_DATABASE_URL": f"sqlite:///{tmp_path}/cli.db",
            "QUEUE_ENGINE_CONFIG": ""}


@pytest.fixture
def sessions(env):
    return make_sessions(env["QUEUE_ENGINE_DATABASE_URL"])


def run(env, *args, code=0):
    result = CliRunner().invoke(main, list(args), env=env)
    assert result.exit_code == code, result.output
    return result.output


def key_row(sessions, name):
    with sessions() as session:
        return session.scalar(select(ApiKey).where(ApiKey.name == name))


def queue_job(sessions, owner_id, env):
    """A queued job of ``owner_id``, stored as the API stores one."""
    settings = load_settings(environ={}, database_url=env["QUEUE_ENGINE_DATABASE_URL"],
                             data_dir=env["QUEUE_ENGINE_DATA_DIR"])
    with transaction(sessions) as session:
        job, _ = create_job(session, owner_id, JobCreate(model="tiny", prompt="abcd", params={"max_tokens": 10}),
                            settings)
    return job.id


def test_keys_create_operator(env, sessions):
    """`keys create NAME --operator` makes an operator key; without the flag it is an ordinary one."""
    created = json.loads(run(env, "keys", "create", "ops", "--operator", "--json").splitlines()[-1])
    assert created["name"] == "ops" and created["key"].startswith("qe_")
    run(env, "keys", "create", "alice")
    assert (key_row(sessions, "ops").is_operator, key_row(sessions, "alice").is_operator) == (True, False)


def test_keys_set_limits_sets_and_clears_each_limit(env, sessions):
    """Each option sets its limit; `none` or `unlimited` clears one; limits not given stay."""
    run(env, "keys", "create", "alice")
    output = run(env, "keys", "set-limits", "alice", "--share", "2.5", "--max-waiting-rows", "100",
                 "--max-waiting-tokens", "50000", "--requests-per-minute", "60", "--token-budget", "1000000",
                 "--budget-period", "month")
    assert "max_waiting_rows 100" in output and "budget_period month" in output
    row = key_row(sessions, "alice")
    assert (row.share, row.max_waiting_rows, row.max_waiting_tokens, row.requests_per_minute, row.token_budget,
            row.budget_period) == (2.5, 100, 50000, 60, 1000000, "month")
    output = run(env, "keys", "set-limits", "alice", "--max-waiting-rows", "none", "--requests-per-minute", "unlimited")
    assert "max_waiting_rows unlimited" in output
    row = key_row(sessions, "alice")
    assert (row.max_waiting_rows, row.requests_per_minute, row.max_waiting_tokens) == (None, None, 50000)


@pytest.mark.parametrize("args, code, message", [
    (["--token-budget", "10"], 1, "token_budget: give its period too"),
    (["--max-waiting-rows", "-3"], 1, "max_waiting_rows: must be a whole number"),
    (["--max-waiting-rows", "lots"], 2, "'lots' is not a whole number, none or unlimited"),
    (["--budget-period", "week"], 2, "'week' is not one of 'day', 'month'"),
    ([], 2, "give at least one limit"),
])
def test_keys_set_limits_refuses_what_it_cannot_apply(env, sessions, args, code, message):
    """A bad value exits non-zero naming the option (2: a usage error, 1: refused), and changes nothing."""
    run(env, "keys", "create", "alice")
    output = run(env, "keys", "set-limits", "alice", *args, code=code)
    assert message in output
    assert key_row(sessions, "alice").token_budget is None


def test_keys_commands_name_an_unknown_key(env):
    """set-limits, show and revoke of a key that does not exist exit 1 saying so."""
    run(env, "db", "upgrade")
    for args in (["set-limits", "nobody", "--share", "2"], ["show", "nobody"], ["revoke", "nobody"]):
        assert "no key named 'nobody'" in run(env, "keys", *args, code=1)


def test_keys_show_gives_limits_waiting_work_and_this_periods_tokens(env, sessions):
    """`keys show NAME --json`: operator flag, share, limits, created/revoked, what waits, tokens used today."""
    run(env, "keys", "create", "alice")
    run(env, "keys", "set-limits", "alice", "--max-waiting-rows", "5", "--token-budget", "900", "--budget-period", "day")
    owner_id = key_row(sessions, "alice").id
    queue_job(sessions, owner_id, env)
    today = utcnow().date()
    with transaction(sessions) as session:
        session.add(UsageDaily(owner_id=owner_id, model="tiny", day=today, requests=2, prompt_tokens=30,
                               completion_tokens=12, engine_seconds=0.1))
        session.add(UsageDaily(owner_id=owner_id, model="tiny", day=date(2000, 1, 1), requests=2, prompt_tokens=999,
                               completion_tokens=1, engine_seconds=0.1))
    shown = json.loads(run(env, "keys", "show", "alice", "--json"))
    assert (shown["is_operator"], shown["share"], shown["max_waiting_rows"], shown["max_waiting_tokens"]) == \
        (False, 1.0, 5, None)
    assert (shown["token_budget"], shown["budget_period"], shown["revoked_at"]) == (900, "day", None)
    assert (shown["waiting_rows"], shown["waiting_tokens"]) == (1, estimate_tokens("abcd", None, 10))
    assert (shown["period"], shown["used_tokens"]) == ("day", 42)
    assert shown["period_resets_at"].startswith(date.fromordinal(today.toordinal() + 1).isoformat())
    text = run(env, "keys", "show", "alice")
    assert "max_waiting_tokens:   unlimited" in text and "waiting_rows:         1" in text


def test_keys_revoke_keeps_the_work_by_default_and_cancels_it_when_asked(env, sessions):
    """`keys revoke NAME` revokes and says the work runs on; again with --cancel-work it cancels that work."""
    run(env, "keys", "create", "alice")
    job_id = queue_job(sessions, key_row(sessions, "alice").id, env)
    output = run(env, "keys", "revoke", "alice")
    assert "revoked" in output and "runs on" in output
    revoked_at = key_row(sessions, "alice").revoked_at
    assert revoked_at is not None
    output = run(env, "keys", "revoke", "alice", "--cancel-work")
    assert "cancelled 1 jobs and 0 batches" in output
    assert key_row(sessions, "alice").revoked_at == revoked_at  # the first revocation stands
    with sessions() as session:
        assert session.get(Job, job_id).status == "cancelled"


def test_every_keys_command_has_help():
    """Each keys command documents itself and its options."""
    for command in ("create", "set-limits", "show", "revoke", "rotate-secret"):
        result = CliRunner().invoke(main, ["keys", command, "--help"])
        assert result.exit_code == 0 and "Usage:" in result.output
