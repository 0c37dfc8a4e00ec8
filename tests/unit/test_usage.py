"""Accounting (``queue_engine.usage``), on SQLite and PostgreSQL: every request
that finishes with a generation adds its tokens and engine seconds to its
key's usage of the model for the day, and to its batch; usage is read per
key, model or day over the API (a key its own, an operator every key's) and
with ``queue-engine usage`` (CSV)."""

import csv
import io
import threading
from datetime import date, timedelta
from typing import NamedTuple

import pytest
from click.testing import CliRunner
from sqlalchemy import func, select, update

from queue_engine import leases, usage
from queue_engine.cli import main
from queue_engine.db import transaction
from queue_engine.errors import EngineRejectedError, InvalidRequestError
from queue_engine.models import ApiKey, Batch, Job, UsageDaily, utcnow
from tests.conftest import make_key
from tests.helpers import assert_matches_openapi, race
from tests.unit.test_protocol import claim, finish, new_batch, new_job
from tests.work import send_chunks

DAY, NEXT_DAY = date(2026, 12, 1), date(2026, 12, 2)


class Timed(NamedTuple):
    """A generation as the engine loop hands it over: with its engine seconds."""

    text: str = "text"
    finish_reason: str = "stop"
    prompt_tokens: int = 1
    completion_tokens: int = 1
    output: dict | None = None
    engine_seconds: float | None = None


@pytest.fixture
def keys(sessions):
    """Two keys, ``alice`` and ``bob``: name -> owner id."""
    return {name: make_key(sessions, name)[1] for name in ("alice", "bob")}


def usage_rows(sessions):
    """Every usage row as ``(owner_id, model, day, requests, prompt, completion, engine_seconds)``."""
    with sessions() as session:
        return sorted(tuple(row) for row in session.execute(select(
            UsageDaily.owner_id, UsageDaily.model, UsageDaily.day, UsageDaily.requests, UsageDaily.prompt_tokens,
            UsageDaily.completion_tokens, UsageDaily.engine_seconds)))


def job_sums(sessions, owner_id):
    """``(succeeded jobs, prompt tokens, completion tokens, engine seconds)`` summed over the key's jobs."""
    with sessions() as session:
        count, prompt, completion, seconds = session.execute(
            select(func.count(), func.sum(Job.prompt_tokens), func.sum(Job.completion_tokens),
                   func.sum(Job.engine_seconds))
            .where(Job.owner_id == owner_id, Job.status == "succeeded")).one()
    return count, int(prompt), int(completion), seconds


def record(sessions, increments):
    with transaction(sessions) as session:
        usage.record(session, increments)


# --- counting: finishing outcomes --------------------------------------------


def test_finish_adds_each_generation_to_its_keys_usage_batch_and_job(sessions, settings, keys):
    """Two finishes (two groups) of two keys' jobs and batch rows: usage holds exactly the succeeded rows' sums."""
    alice, bob = keys["alice"], keys["bob"]
    jobs = [new_job(sessions, settings, alice, f"q{i}") for i in range(3)] + [new_job(sessions, settings, bob)]
    batch_id = new_batch(sessions, settings, alice, ["r0", "r1", "r2", "r3"])
    items = {item.id: item for item in claim(sessions, job_ids=jobs, chunks=[(batch_id, 0)])}
    rows = sorted(item.id for item in items.values() if item.batch_id)
    first = [jobs[0], jobs[3], rows[0], rows[1]]
    finish(sessions, settings, [
        leases.Outcome(items[job_id], Timed(prompt_tokens=10 + n, completion_tokens=n + 1, engine_seconds=0.25 * n))
        for n, job_id in enumerate(first)])
    finish(sessions, settings, [
        leases.Outcome(items[jobs[1]], Timed(prompt_tokens=7, completion_tokens=3, engine_seconds=0.5)),
        leases.Outcome(items[rows[2]], Timed(prompt_tokens=5, completion_tokens=2, engine_seconds=0.125)),
        leases.Outcome(items[rows[3]], error=EngineRejectedError("too long")),  # fails: counts nowhere
        leases.Outcome(items[jobs[2]], Timed(prompt_tokens=4, completion_tokens=4)),  # no engine time known: 0
    ])

    with sessions() as session:
        day = session.get(Job, jobs[0]).finished_at.date()
        assert session.get(Job, jobs[1]).engine_seconds == 0.5
        assert session.get(Job, jobs[2]).engine_seconds is None
        batch = session.get(Batch, batch_id)
        assert (batch.prompt_tokens, batch.completion_tokens, batch.engine_seconds) == (12 + 13 + 5, 3 + 4 + 2,
                                                                                        0.5 + 0.75 + 0.125)
    assert usage_rows(sessions) == sorted([
        (alice, "tiny", day, 6, 10 + 7 + 4 + 12 + 13 + 5, 1 + 3 + 4 + 3 + 4 + 2, 0.0 + 0.5 + 0.5 + 0.75 + 0.125),
        (bob, "tiny", day, 1, 11, 2, 0.25),
    ])
    # Usage sums are the sums of the rows' token counts.
    for owner in (alice, bob):
        count, prompt, completion, seconds = job_sums(sessions, owner)
        [row] = [row for row in usage_rows(sessions) if row[0] == owner]
        assert row[3:6] == (count, prompt, completion) and row[6] == pytest.approx(seconds)


def test_record_keeps_keys_models_and_days_apart_and_adds_to_what_is_there(sessions, keys):
    """Increments are grouped per (key, model, day) and added to the row already there."""
    alice, bob = keys["alice"], keys["bob"]
    record(sessions, [usage.Increment(alice, "tiny", DAY, 1, 10, 2, 0.5),
                      usage.Increment(alice, "tiny", NEXT_DAY, 1, 20, 4, 1.0),
                      usage.Increment(alice, "tiny", DAY, 1, 30, 6, 1.5),
                      usage.Increment(alice, "big", DAY, 1, 1, 1, 0.25),
                      usage.Increment(bob, "tiny", DAY, 1, 5, 5, 2.0)])
    record(sessions, [usage.Increment(alice, "tiny", DAY, 2, 100, 10, 4.0)])
    assert usage_rows(sessions) == sorted([
        (alice, "tiny", DAY, 4, 140, 18, 6.0), (alice, "tiny", NEXT_DAY, 1, 20, 4, 1.0),
        (alice, "big", DAY, 1, 1, 1, 0.25), (bob, "tiny", DAY, 1, 5, 5, 2.0),
    ])


def test_concurrent_workers_lose_no_increment(sessions, keys):
    """Eight threads each finishing 10 times for the same key and day: every increment counted."""
    alice = keys["alice"]

    def worker():
        for _ in range(10):
            record(sessions, [usage.Increment(alice, "tiny", DAY, 1, 3, 2, 0.5),
                              usage.Increment(alice, "tiny", NEXT_DAY, 1, 1, 1, 0.25)])

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert usage_rows(sessions) == [(alice, "tiny", DAY, 80, 240, 160, 40.0), (alice, "tiny", NEXT_DAY, 80, 80, 80, 20.0)]


@pytest.mark.postgres
def test_transactions_racing_to_create_the_same_usage_row_both_count_on_postgresql(sessions, keys, database_url):
    """Four transactions, all begun before any inserts, create the same new row: it holds all four."""
    if not database_url.startswith("postgresql"):
        pytest.skip("SQLite has one writer at a time; the race needs PostgreSQL")
    alice = keys["alice"]
    race(sessions, [lambda session: usage.record(session, [usage.Increment(alice, "tiny", DAY, 1, 7, 3, 0.5)])] * 4)
    assert usage_rows(sessions) == [(alice, "tiny", DAY, 4, 28, 12, 2.0)]


# --- reading ---------------------------------------------------------------


@pytest.fixture
def history(sessions, keys):
    """Two keys' usage of two models over three days."""
    alice, bob = keys["alice"], keys["bob"]
    record(sessions, [usage.Increment(alice, "tiny", DAY - timedelta(days=1), 1, 1000, 1000, 9.0),
                      usage.Increment(alice, "tiny", DAY, 2, 10, 4, 0.5),
                      usage.Increment(alice, "big", DAY, 1, 20, 8, 1.5),
                      usage.Increment(alice, "tiny", NEXT_DAY, 3, 30, 12, 2.0),
                      usage.Increment(bob, "tiny", NEXT_DAY, 5, 50, 20, 4.0)])
    return keys


def totals(requests, prompt, completion, seconds):
    return {"requests": requests, "prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion, "engine_seconds": seconds}


def test_read_usage_groups_by_key_model_or_day_within_the_dates(sessions, history):
    """Sums per group over the days asked for (both included); one key's or every key's."""
    alice = history["alice"]
    with sessions() as session:
        by_key = usage.read_usage(session, None, DAY, NEXT_DAY, "key")
        by_model = usage.read_usage(session, alice, DAY, NEXT_DAY, "model")
        by_day = usage.read_usage(session, None, DAY, NEXT_DAY, "day")
        one_day = usage.read_usage(session, None, NEXT_DAY, NEXT_DAY, "key")
        nothing = usage.read_usage(session, alice, DAY + timedelta(days=30), DAY + timedelta(days=31), "day")
    assert by_key == [{"key": "alice", **totals(6, 60, 24, 4.0)}, {"key": "bob", **totals(5, 50, 20, 4.0)}]
    assert by_model == [{"model": "big", **totals(1, 20, 8, 1.5)}, {"model": "tiny", **totals(5, 40, 16, 2.5)}]
    assert by_day == [{"day": DAY, **totals(3, 30, 12, 2.0)}, {"day": NEXT_DAY, **totals(8, 80, 32, 6.0)}]
    assert one_day == [{"key": "alice", **totals(3, 30, 12, 2.0)}, {"key": "bob", **totals(5, 50, 20, 4.0)}]
    assert nothing == []


def test_period_defaults_to_this_month_and_refuses_bad_dates():
    """No dates: the month so far; a date that is not YYYY-MM-DD, or from after to, names the field."""
    assert usage.period(None, None, date(2026, 12, 9)) == (date(2026, 12, 1), date(2026, 12, 9))
    assert usage.period("2026-11-30", None, date(2026, 12, 9)) == (date(2026, 11, 30), date(2026, 12, 9))
    for date_from, date_to, param in [("2026-13-01", None, "from"), ("yesterday", None, "from"),
                                      ("20261201", None, "from"), (None, "2026-12-1", "to"),
                                      ("2026-12-05", "2026-12-04", "from")]:
        with pytest.raises(InvalidRequestError, match=f"^{param}: ") as raised:
            usage.period(date_from, date_to, date(2026, 12, 9))
        assert raised.value.param == param


# --- the API ---------------------------------------------------------------------


def make_operator(app, name):
    """An operator's key (``is_operator``): its Authorization header."""
    sessions = app.extensions["qe_sessions"]
    key, owner_id = make_key(sessions, name)
    with transaction(sessions) as session:
        session.execute(update(ApiKey).where(ApiKey.id == owner_id).values(is_operator=True))
    return {"Authorization": f"Bearer {key.key}"}


@pytest.fixture
def api_history(app, auth):
    """``alice`` (``auth``) and ``bob`` used ``tiny`` on DAY and NEXT_DAY."""
    sessions = app.extensions["qe_sessions"]
    bob = make_key(sessions, "bob")[1]
    with sessions() as session:
        alice = session.scalar(select(ApiKey.id).where(ApiKey.name == "alice"))
    record(sessions, [usage.Increment(alice, "tiny", DAY, 2, 10, 4, 0.5),
                      usage.Increment(alice, "tiny", NEXT_DAY, 1, 5, 1, 0.25),
                      usage.Increment(bob, "tiny", DAY, 7, 70, 7, 3.0)])


def test_usage_endpoint_answers_a_keys_own_usage(client, auth, spec, api_history):
    """GET /api/v1/usage: the caller's usage only, grouped as asked, with its total."""
    body = assert_matches_openapi(spec, "/api/v1/usage", "get", client.get(
        "/api/v1/usage?from=2026-12-01&to=2026-12-02&group_by=day", headers=auth))
    assert body == {"from": "2026-12-01", "to": "2026-12-02", "group_by": "day",
                    "data": [{"day": "2026-12-01", **totals(2, 10, 4, 0.5)},
                             {"day": "2026-12-02", **totals(1, 5, 1, 0.25)}],
                    "total": totals(3, 15, 5, 0.75)}
    by_key = client.get("/api/v1/usage?from=2026-12-01&to=2026-12-31&group_by=key", headers=auth).get_json()
    assert by_key["data"] == [{"key": "alice", **totals(3, 15, 5, 0.75)}]


def test_usage_endpoint_defaults_to_this_month_by_model(client, auth, spec):
    """Without arguments: from the first of this month to today (UTC), grouped by model."""
    today = utcnow().date()
    body = assert_matches_openapi(spec, "/api/v1/usage", "get", client.get("/api/v1/usage", headers=auth))
    assert body == {"from": today.replace(day=1).isoformat(), "to": today.isoformat(), "group_by": "model",
                    "data": [], "total": totals(0, 0, 0, 0.0)}


def test_an_operator_reads_every_keys_usage_and_others_may_not(app, client, auth, spec, api_history):
    """all=true: every key's usage for an operator's key; a 403 operator_only for any other key."""
    operator = make_operator(app, "ops")
    body = assert_matches_openapi(spec, "/api/v1/usage", "get", client.get(
        "/api/v1/usage?from=2026-12-01&to=2026-12-02&group_by=key&all=true", headers=operator))
    assert body["data"] == [{"key": "alice", **totals(3, 15, 5, 0.75)}, {"key": "bob", **totals(7, 70, 7, 3.0)}]
    assert body["total"] == totals(10, 85, 12, 3.75)
    own = client.get("/api/v1/usage?from=2026-12-01&to=2026-12-02&group_by=key", headers=operator).get_json()
    assert own["data"] == []  # without all=true, an operator's own usage
    refused = client.get("/api/v1/usage?all=true", headers=auth)
    assert_matches_openapi(spec, "/api/v1/usage", "get", refused)
    assert refused.status_code == 403 and refused.get_json()["error"]["code"] == "operator_only"


@pytest.mark.parametrize("query, param", [
    ("from=2026-02-30", "from"), ("from=12/01/2026", "from"), ("to=tomorrow", "to"),
    ("from=2026-12-05&to=2026-12-01", "from"), ("group_by=week", "group_by"), ("all=yes", "all"),
    ("from=%00", "from"),
])
def test_usage_endpoint_refuses_bad_arguments_naming_them(client, auth, spec, query, param):
    """A bad date, period, grouping or `all` is a 400 {error: {code, message, param}} naming the field."""
    response = client.get(f"/api/v1/usage?{query}", headers=auth)
    error = assert_matches_openapi(spec, "/api/v1/usage", "get", response)["error"]
    assert response.status_code == 400 and error["param"] == param and error["message"].startswith(f"{param}: ")


def test_usage_endpoint_needs_a_key(client):
    """Like every /api/v1 endpoint: 401 without a key."""
    assert client.get("/api/v1/usage").status_code == 401


# --- the batch object --------------------------------------------------------------


def test_the_batch_object_carries_its_rows_totals(client, auth, spec, app, settings):
    """GET /api/v1/batches/{id}: usage {prompt, completion, total tokens, engine seconds} of its finished rows."""
    response = client.post("/api/v1/batches", headers=auth, data={
        "model": "tiny", "file": (io.BytesIO(b"prompt\none\ntwo\nthree\n"), "rows.csv")})
    batch_id = response.get_json()["id"]
    assert response.get_json()["usage"] == {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0,
                                            "engine_seconds": 0.0}
    sessions = app.extensions["qe_sessions"]
    with transaction(sessions) as session:
        send_chunks(session, settings)  # as the dispatcher does
    items = claim(sessions, chunks=[(batch_id, 0)])
    finish(sessions, settings, [leases.Outcome(items[0], Timed(prompt_tokens=6, completion_tokens=2,
                                                               engine_seconds=0.5))])
    running = assert_matches_openapi(spec, "/api/v1/batches/{batch_id}", "get",
                                     client.get(f"/api/v1/batches/{batch_id}", headers=auth))
    assert running["usage"] == {"prompt_tokens": 6, "completion_tokens": 2, "total_tokens": 8, "engine_seconds": 0.5}
    finish(sessions, settings, [leases.Outcome(item, Timed(prompt_tokens=4, completion_tokens=3, engine_seconds=0.25))
                                for item in items[1:]])
    done = client.get(f"/api/v1/batches/{batch_id}", headers=auth).get_json()
    assert done["status"] == "completed"
    assert done["usage"] == {"prompt_tokens": 14, "completion_tokens": 8, "total_tokens": 22, "engine_seconds": 1.0}


# --- the CLI -------------------------------------------------------------------------


def test_cli_usage_writes_every_keys_usage_as_csv(sessions, history, tmp_path, database_url):
    """`queue-engine usage --from --to --by key|model|day [--key NAME]`: CSV with a header row."""
    env = {"QUEUE_ENGINE_DATA_DIR": str(tmp_path), "QUEUE_ENGINE_DATABASE_URL": database_url, "QUEUE_ENGINE_CONFIG": ""}

    def run(*args):
        result = CliRunner().invoke(main, ["usage", *args], env=env)
        assert result.exit_code == 0, result.output
        return list(csv.reader(io.StringIO(result.stdout)))

    header = ["requests", "prompt_tokens", "completion_tokens", "total_tokens", "engine_seconds"]
    assert run("--from", "2026-12-01", "--to", "2026-12-02", "--by", "key") == [
        ["key", *header], ["alice", "6", "60", "24", "84", "4.0"], ["bob", "5", "50", "20", "70", "4.0"]]
    assert run("--from", "2026-11-30", "--to", "2026-12-02", "--by", "day", "--key", "alice") == [
        ["day", *header], ["2026-11-30", "1", "1000", "1000", "2000", "9.0"], ["2026-12-01", "3", "30", "12", "42", "2.0"],
        ["2026-12-02", "3", "30", "12", "42", "2.0"]]
    assert run("--from", "2026-12-01", "--to", "2026-12-01", "--by", "model") == [
        ["model", *header], ["big", "1", "20", "8", "28", "1.5"], ["tiny", "2", "10", "4", "14", "0.5"]]


def test_cli_usage_refuses_a_bad_date(tmp_path):
    """A date that is not YYYY-MM-DD: exit 1 with a message naming it."""
    env = {"QUEUE_ENGINE_DATA_DIR": str(tmp_path), "QUEUE_ENGINE_DATABASE_URL": f"sqlite:///{tmp_path}/cli.db",
           "QUEUE_ENGINE_CONFIG": ""}
    result = CliRunner().invoke(main, ["usage", "--from", "1 December"], env=env)
    assert result.exit_code == 1 and "from: '1 December' is not a date as YYYY-MM-DD" in result.output
