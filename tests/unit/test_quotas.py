"""Quotas per key (``queue_engine.quotas``, ``queue_engine.ratelimit``) over
the Flask test client with a fakeredis broker: each quota refuses a
submission over it with a 429 that names the limit, stores nothing of it,
and lets work through again once the key is back under it."""

import io
import json
from datetime import timedelta

import pytest
from sqlalchemy import func, select

from queue_engine import apikeys, quotas
from queue_engine.db import transaction
from queue_engine.jobs import estimate_tokens
from queue_engine.models import Batch, BatchChunk, File, Job, UsageDaily, utcnow
from queue_engine.ratelimit import LocalRateLimiter
from tests.conftest import make_key
from tests.helpers import assert_matches_openapi


class Clock:
    def __init__(self, now=1_000_000.0):
        self.now = now

    def __call__(self):
        return self.now


def limited_key(app, name="alice", **limits):
    """A new key with ``limits`` set: ``(headers, owner_id)``."""
    key, owner_id = make_key(app.extensions["qe_sessions"], name)
    with transaction(app.extensions["qe_sessions"]) as session:
        apikeys.set_key_limits(session, name, **limits)
    return {"Authorization": f"Bearer {key.key}"}, owner_id


def submit(client, headers, prompt="abcd", max_tokens=10):
    return client.post("/api/v1/jobs", json={"model": "tiny", "prompt": prompt, "params": {"max_tokens": max_tokens}},
                       headers=headers)


def upload(client, headers, rows, **fields):
    data = "id,prompt\n" + "".join(f"{n},row {n}\n" for n in range(rows))
    form = {"model": "tiny", **fields, "file": (io.BytesIO(data.encode()), "rows.csv")}
    return client.post("/api/v1/batches", data=form, headers=headers, content_type="multipart/form-data")


def count(app, model, *where):
    with app.extensions["qe_sessions"]() as session:
        return session.scalar(select(func.count()).select_from(model).where(*where))


def refused(response, code, *words):
    """The answer is a 429 ``code`` whose message holds every one of ``words``."""
    assert response.status_code == 429, response.get_json()
    error = response.get_json()["error"]
    assert error["code"] == code
    for word in words:
        assert word in error["message"]
    return error["message"]


def test_max_waiting_rows_refuses_a_job_over_it_and_allows_one_again_when_under(app, client, spec):
    """The third job over max_waiting_rows 2 is a 429 naming the limit, its value and what waits; nothing is
    stored (under an Idempotency-Key too); once a job is cancelled another is accepted."""
    headers, _ = limited_key(app, max_waiting_rows=2)
    first = submit(client, headers).get_json()["id"]
    assert submit(client, headers).status_code == 202
    response = client.post("/api/v1/jobs", json={"model": "tiny", "prompt": "abcd"},
                           headers={**headers, "Idempotency-Key": "third"})
    refused(response, "quota_exceeded", "max_waiting_rows", "2 requests", "2 are now", "adds 1")
    assert_matches_openapi(spec, "/api/v1/jobs", "post", response)
    assert count(app, Job) == 2
    assert client.post(f"/api/v1/jobs/{first}/cancel", headers=headers).status_code == 200
    assert submit(client, headers).status_code == 202
    assert count(app, Job) == 3


def test_max_waiting_rows_counts_batch_rows_and_refuses_a_batch_whole(app, client):
    """A batch whose rows take the key over max_waiting_rows is refused with its upload rolled back: no batch,
    no row, no chunk; a smaller one fits, and then a job does not."""
    headers, _ = limited_key(app, max_waiting_rows=5)
    assert submit(client, headers).status_code == 202
    refused(upload(client, headers, 5), "quota_exceeded", "max_waiting_rows", "1 are now", "adds 5")
    assert (count(app, Batch), count(app, Job, Job.batch_id.is_not(None)), count(app, BatchChunk)) == (0, 0, 0)
    assert upload(client, headers, 4).status_code == 202
    refused(submit(client, headers), "quota_exceeded", "5 are now")


def test_max_waiting_rows_refuses_a_tribunal_by_its_steps(app, client):
    """A tribunal counts its steps (here three candidates) and is refused whole: neither it nor a step is kept."""
    headers, _ = limited_key(app, max_waiting_rows=2)
    body = {"prompt": "Why?", "candidates": ["tiny", "tiny", "tiny"], "judge": "tiny", "bypass": "never"}
    refused(client.post("/api/v1/tribunals", json=body, headers=headers), "quota_exceeded", "adds 3")
    assert count(app, Job) == 0
    body["candidates"] = ["tiny", "tiny"]
    assert client.post("/api/v1/tribunals", json=body, headers=headers).status_code == 202


def test_max_waiting_tokens_refuses_work_over_its_estimated_tokens(app, client):
    """Tokens are estimated as prompt characters / 4 + max_tokens: two jobs of 11 fit in 25, a third does not."""
    assert estimate_tokens("abcd", None, 10) == 11
    headers, _ = limited_key(app, max_waiting_tokens=25)
    assert submit(client, headers).status_code == 202
    assert submit(client, headers).status_code == 202
    refused(submit(client, headers), "quota_exceeded", "max_waiting_tokens", "25 tokens", "22 are now", "adds 11")
    assert count(app, Job) == 2
    assert submit(client, headers, prompt="abc", max_tokens=2).status_code == 202  # 1 + 2 = 3 more: 25


def test_a_batch_plans_its_tokens_and_counts_them_while_its_rows_wait(app, client):
    """planned_tokens holds the runnable rows' estimate at upload (a row that cannot run is left out), and the
    waiting tokens count it scaled by the rows not ended."""
    headers, owner_id = limited_key(app, max_waiting_tokens=10_000)
    data = "id,prompt\n1,row one\n2,\n3,row three\n"  # row 2 is blank: it fails at upload
    form = {"model": "tiny", "params": json.dumps({"max_tokens": 20}), "file": (io.BytesIO(data.encode()), "r.csv")}
    batch = client.post("/api/v1/batches", data=form, headers=headers, content_type="multipart/form-data").get_json()
    with app.extensions["qe_sessions"]() as session:
        planned = session.get(Batch, batch["id"]).planned_tokens
        assert planned == estimate_tokens("row one", None, 20) + estimate_tokens("row three", None, 20) == 45
        assert quotas.waiting_of(session, owner_id) == quotas.Waiting(rows=2, tokens=45 * 2 // 3)


def test_v1_submissions_over_a_quota_are_refused_in_openais_shape(app, client):
    """/v1/chat/completions and /v1/batches over max_waiting_rows answer 429 in OpenAI's error shape and keep
    nothing (for a /v1 batch: no batch, no rows, no output files)."""
    headers, _ = limited_key(app, max_waiting_rows=0)  # a chat request that passed would wait for a worker
    response = client.post("/v1/chat/completions", headers=headers,
                           json={"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
    error = response.get_json()["error"]
    assert response.status_code == 429 and set(error) == {"message", "type", "param", "code"}
    assert error["code"] == "quota_exceeded" and "max_waiting_rows" in error["message"]
    lines = [json.dumps({"custom_id": f"r{n}", "method": "POST", "url": "/v1/chat/completions",
                         "body": {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}]}})
             for n in range(2)]
    form = {"file": (io.BytesIO(("\n".join(lines) + "\n").encode()), "input.jsonl"), "purpose": "batch"}
    file_id = client.post("/v1/files", data=form, headers=headers, content_type="multipart/form-data").get_json()["id"]
    response = client.post("/v1/batches", headers=headers,
                           json={"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"})
    assert response.status_code == 429 and response.get_json()["error"]["code"] == "quota_exceeded"
    assert (count(app, Batch), count(app, Job), count(app, File)) == (0, 0, 1)  # only the input file


def test_token_budget_refuses_new_work_once_the_days_usage_reaches_it(app, client, spec):
    """With 90 of a 100-token daily budget used work is accepted; at 100 it is refused (429
    token_budget_exhausted) saying when the day resets, with Retry-After; yesterday's usage does not count."""
    headers, owner_id = limited_key(app, token_budget=100, budget_period="day")
    today = utcnow().date()
    with transaction(app.extensions["qe_sessions"]) as session:
        session.add(UsageDaily(owner_id=owner_id, model="tiny", day=today - timedelta(days=1), requests=9,
                               prompt_tokens=5000, completion_tokens=5000, engine_seconds=1.0))
        session.add(UsageDaily(owner_id=owner_id, model="tiny", day=today, requests=3, prompt_tokens=60,
                               completion_tokens=30, engine_seconds=1.0))
    assert submit(client, headers).status_code == 202
    with transaction(app.extensions["qe_sessions"]) as session:
        session.add(UsageDaily(owner_id=owner_id, model="other", day=today, requests=1, prompt_tokens=4,
                               completion_tokens=6, engine_seconds=0.5))
    tomorrow = (today + timedelta(days=1)).isoformat()
    response = submit(client, headers)
    refused(response, "token_budget_exhausted", "token_budget", "100 tokens per day", "100 used",
            f"resets at {tomorrow}T00:00:00+00:00")
    assert_matches_openapi(spec, "/api/v1/jobs", "post", response)
    assert 0 < int(response.headers["Retry-After"]) <= 86400
    assert count(app, Job) == 1
    refused(upload(client, headers, 2), "token_budget_exhausted")
    assert count(app, Batch) == 0
    assert client.get("/api/v1/jobs", headers=headers).status_code == 200  # reading is not work


def test_a_monthly_token_budget_counts_every_day_of_the_month(app, client):
    """A budget per month adds up the usage of the month's days, from the 1st (UTC)."""
    headers, owner_id = limited_key(app, token_budget=50, budget_period="month")
    with transaction(app.extensions["qe_sessions"]) as session:
        session.add(UsageDaily(owner_id=owner_id, model="tiny", day=utcnow().date().replace(day=1), requests=1,
                               prompt_tokens=20, completion_tokens=30, engine_seconds=1.0))
    refused(submit(client, headers), "token_budget_exhausted", "per month")


def test_requests_per_minute_refuses_the_request_over_it_with_retry_after(app, client, spec):
    """Every authenticated request counts; the fourth of a 3-a-minute key is a 429 rate_limited whose
    Retry-After is the seconds left in the minute; in the next minute it is let through again."""
    headers, _ = limited_key(app, requests_per_minute=3)
    clock = Clock(6_000_000.0 + 45.5)  # 45.5 s into a minute
    app.extensions["qe_rate_limiter"].clock = clock
    assert client.get("/api/v1/jobs", headers=headers).status_code == 200
    assert submit(client, headers).status_code == 202
    assert client.get("/api/v1/batches", headers=headers).status_code == 200
    response = submit(client, headers)
    refused(response, "rate_limited", "requests_per_minute", "3 requests a minute", "request 4")
    assert response.headers["Retry-After"] == "15"
    assert_matches_openapi(spec, "/api/v1/jobs", "post", response)
    assert count(app, Job) == 1
    clock.now += 15
    assert submit(client, headers).status_code == 202


def test_a_key_without_a_rate_limit_is_not_counted(app, client, broker):
    """A key with no requests_per_minute is never refused and costs no counter in Redis."""
    headers, _ = limited_key(app)
    for _ in range(20):
        assert client.get("/api/v1/jobs", headers=headers).status_code == 200
    assert broker.keys("qe:rate:*") == []


def test_local_rate_limiter_counts_per_key_and_window():
    """The embedded mode's counter: per key, starting over each window."""
    clock = Clock(120.0)
    limiter = LocalRateLimiter(clock=clock)
    alice, bob = apikeys.KeyIdentity(1, "alice", requests_per_minute=2), apikeys.KeyIdentity(2, "bob",
                                                                                            requests_per_minute=2)
    limiter.check(alice)
    limiter.check(alice)
    limiter.check(bob)
    with pytest.raises(Exception, match="requests_per_minute: this key may send 2") as refusal:
        limiter.check(alice)
    assert (refusal.value.code, refusal.value.retry_after) == ("rate_limited", 60)
    clock.now += 60
    limiter.check(alice)


@pytest.mark.parametrize("changes, message", [
    ({"max_waiting_rows": -1}, "max_waiting_rows: must be a whole number"),
    ({"requests_per_minute": 1.5}, "requests_per_minute: must be a whole number"),
    ({"share": 0}, "share: must be a number above 0"),
    ({"budget_period": "week"}, "budget_period: must be one of day, month"),
    ({"token_budget": 10}, "token_budget: give its period too"),
])
def test_set_key_limits_refuses_values_it_cannot_apply(sessions, changes, message):
    """Each bad limit is refused naming the field."""
    make_key(sessions, "alice")
    with pytest.raises(Exception, match=message), transaction(sessions) as session:
        apikeys.set_key_limits(session, "alice", **changes)
