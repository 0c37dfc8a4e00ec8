"""Webhook events, on SQLite and PostgreSQL: which ends record an event, how
events are claimed and sent, what each outcome leads to, redelivery, and the
signatures a receiver checks with the ``standardwebhooks`` library.

Real HTTP attempts are in ``test_webhook_delivery.py``; real workers and a
real receiver in ``tests/integration/test_webhooks.py``.
"""

import io
import json
from datetime import timedelta

import pytest
from sqlalchemy import select, update
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from queue_engine import apikeys, batches, jobs, leases, uploads, webhooks
from queue_engine.db import transaction
from queue_engine.errors import InvalidRequestError
from queue_engine.models import ApiKey, WebhookDelivery, WebhookEvent, utcnow
from queue_engine.schemas import BatchCreate, JobCreate
from queue_engine.settings import ModelProfile, load_settings
from queue_engine.webhooks import EventState, Outcome
from tests.conftest import make_key
from tests.helpers import race
from tests.unit.test_tribunal import new_tribunal, run_step
from tests.work import Generated, claim_chunk, claim_job, reject, succeed

HOOK = "https://hooks.example.org/qe"
DELAYS = [5, 300, 1800]


@pytest.fixture
def settings(tmp_path, database_url):
    """Two profiles, as the tribunal helpers expect."""
    models = {"tiny-b": ModelProfile(path="tiny", engine_args={"max_model_len": 256, "seed": 1})}
    return load_settings(environ={}, data_dir=tmp_path, database_url=database_url, models=models)


@pytest.fixture
def owner(sessions):
    return make_key(sessions, "alice")[1]


def submit(sessions, settings, owner, **fields):
    body = {"model": "tiny", "prompt": "Hi", "webhook_url": HOOK, **fields}
    with transaction(sessions) as session:
        job, _ = jobs.create_job(session, owner, JobCreate.model_validate(body), settings)
    return job.id


def end_job(sessions, settings, job_id, fail=None):
    """End a job as a worker does (``leases.finish``): outcome and event in one transaction."""
    with transaction(sessions) as session:
        assert claim_job(session, job_id) is not None
    with transaction(sessions) as session:
        if fail:
            finished = reject(session, settings, job_id, fail)
        else:
            finished = succeed(session, settings, job_id, text="Hello!", prompt_tokens=3, completion_tokens=2)
    assert finished.ended == [job_id]


def events(sessions):
    with sessions() as session:
        return list(session.scalars(select(WebhookEvent).order_by(WebhookEvent.id)))


def deliveries(sessions, event_id):
    with sessions() as session:
        return list(session.scalars(
            select(WebhookDelivery).where(WebhookDelivery.event_id == event_id).order_by(WebhookDelivery.attempt)))


# --- which ends are announced ---------------------------------------------------


def test_a_finished_job_records_one_event_whose_data_is_the_job_object(sessions, settings, owner):
    job_id = submit(sessions, settings, owner, metadata={"run": "7"})
    end_job(sessions, settings, job_id)
    [event] = events(sessions)
    body = json.loads(event.body)
    assert (event.type, event.url, event.job_id, event.status) == ("job.completed", HOOK, job_id, "pending")
    assert event.id.startswith("msg_") and set(body) == {"type", "timestamp", "data"}
    assert body["type"] == "job.completed"
    with sessions() as session:
        assert body["data"] == jobs.job_to_dict(jobs.get_job(session, owner, job_id))
    assert body["data"]["result"]["text"] == "Hello!" and body["data"]["metadata"] == {"run": "7"}


def test_a_failed_job_records_job_failed_with_its_error(sessions, settings, owner):
    job_id = submit(sessions, settings, owner)
    end_job(sessions, settings, job_id, fail="prompt too long")
    [event] = events(sessions)
    data = json.loads(event.body)["data"]
    assert event.type == "job.failed" and data["error"] == {"code": "engine_rejected", "message": "prompt too long"}


def test_no_webhook_url_or_a_cancelled_job_records_nothing(sessions, settings, owner):
    end_job(sessions, settings, submit(sessions, settings, owner, webhook_url=None))
    cancelled = submit(sessions, settings, owner)
    with transaction(sessions) as session:
        jobs.cancel_job(session, owner, cancelled)
        jobs.announce_end(session, cancelled)
    assert events(sessions) == []


def test_a_tribunal_announces_its_end_once_and_its_steps_nothing(sessions, settings, owner):
    job, steps = new_tribunal(sessions, settings, owner, webhook_url=HOOK)
    critique = [s for step in steps for s in run_step(sessions, settings, step.id)]
    revision = run_step(sessions, settings, critique[0].id, "critique")
    run_step(sessions, settings, revision[0].id, "the final answer")
    [event] = events(sessions)
    data = json.loads(event.body)["data"]
    assert (event.type, event.job_id) == ("job.completed", job.id)
    assert data["kind"] == "tribunal" and data["result"]["text"] == "the final answer"
    assert data["tribunal"]["final"] == "the final answer"


def test_a_tribunal_whose_step_fails_announces_job_failed(sessions, settings, owner):
    job, steps = new_tribunal(sessions, settings, owner, webhook_url=HOOK)
    run_step(sessions, settings, steps[0].id, fail="no room")
    [event] = events(sessions)
    assert (event.type, event.job_id) == ("job.failed", job.id)
    assert "candidate 1 of 2" in json.loads(event.body)["data"]["error"]["message"]


def new_batch(sessions, settings, owner, csv_text, webhook_url=HOOK):
    request = BatchCreate(model="tiny", webhook_url=webhook_url)
    reader = uploads.read_rows(io.BytesIO(csv_text.encode()), "csv", uploads.Upload.from_request(request, settings))
    with transaction(sessions) as session:
        batch = batches.create_batch(session, owner, settings, request, reader, file_format="csv", filename="f.csv")
    return batch


def run_chunk(sessions, settings, batch_id, chunk=0):
    with transaction(sessions) as session:
        rows = claim_chunk(session, batch_id, chunk)
        leases.finish(session, "w1", [leases.Outcome(row, Generated("ok")) for row in rows], settings)


def test_a_batch_announces_its_end_once_with_its_counts(sessions, settings, owner):
    batch = new_batch(sessions, settings, owner, "id,prompt\n1,a\n2,b\n3,  \n")  # the empty prompt fails its row
    assert events(sessions) == []
    run_chunk(sessions, settings, batch.id)
    run_chunk(sessions, settings, batch.id)  # a redelivered chunk: nothing left to run, nothing announced
    [event] = events(sessions)
    data = json.loads(event.body)["data"]
    assert (event.type, event.batch_id, event.job_id) == ("batch.completed", batch.id, None)
    assert data["status"] == "completed"
    assert data["request_counts"] == {"total": 3, "completed": 2, "failed": 1, "cancelled": 0}


def test_a_cancelled_batch_announces_batch_cancelled(sessions, settings, owner):
    batch = new_batch(sessions, settings, owner, "prompt\na\nb\n")
    with transaction(sessions) as session:
        batches.cancel_batch(session, owner, batch.id)
    [event] = events(sessions)
    assert event.type == "batch.cancelled"
    assert json.loads(event.body)["data"]["request_counts"]["cancelled"] == 2


def test_a_batch_whose_every_row_is_unusable_announces_batch_failed_at_once(sessions, settings, owner):
    batch = new_batch(sessions, settings, owner, "id,prompt\n1, \n2,  \n")
    assert batch.status == "failed"
    assert [e.type for e in events(sessions)] == ["batch.failed"]


# --- the relay and the attempts --------------------------------------------------


@pytest.fixture
def event_id(sessions, settings, owner):
    end_job(sessions, settings, submit(sessions, settings, owner))
    return events(sessions)[0].id


def attempt(sessions, outcome, delays=DELAYS):
    """Relay the due event, make one attempt with ``outcome``; returns (attempt, new state)."""
    with transaction(sessions) as session:
        [event_id] = webhooks.claim_due(session)
    with transaction(sessions) as session:
        taken = webhooks.start_attempt(session, event_id)
    with transaction(sessions) as session:
        return taken, webhooks.finish_attempt(session, taken, outcome, delays)


def make_due(sessions, event_id):
    with transaction(sessions) as session:
        session.execute(update(WebhookEvent).where(WebhookEvent.id == event_id).values(next_attempt_at=utcnow()))


def test_a_due_event_is_claimed_by_one_relay_only(sessions, event_id):
    with transaction(sessions) as session:
        assert webhooks.claim_due(session) == [event_id]
    with transaction(sessions) as session:
        assert webhooks.claim_due(session) == []
    assert events(sessions)[0].status == "queued"


@pytest.mark.postgres
def test_two_relays_racing_on_postgresql_split_the_due_events(sessions, settings, owner, database_url):
    if not database_url.startswith("postgresql"):
        pytest.skip("SQLite has one writer at a time; the race needs PostgreSQL")
    for _ in range(40):
        end_job(sessions, settings, submit(sessions, settings, owner))
    first, second = race(sessions, [lambda session: webhooks.claim_due(session, limit=40)] * 2)
    assert len(first) + len(second) == 40 and not set(first) & set(second)


def test_a_duplicate_message_does_not_make_a_second_attempt(sessions, event_id):
    with transaction(sessions) as session:
        webhooks.claim_due(session)
    with transaction(sessions) as session:
        first = webhooks.start_attempt(session, event_id)
    with transaction(sessions) as session:
        assert webhooks.start_attempt(session, event_id) is None
    assert first.number == 1 and first.event_id == event_id


def test_an_event_whose_message_or_sender_was_lost_is_sent_again_after_its_lease(sessions, event_id):
    with transaction(sessions) as session:
        webhooks.claim_due(session)
        webhooks.start_attempt(session, event_id)  # the sender dies here
    later = utcnow() + timedelta(seconds=webhooks.SENDING_LEASE + 1)
    with transaction(sessions) as session:
        assert webhooks.claim_due(session, now=later) == [event_id]
    with transaction(sessions) as session:
        assert webhooks.start_attempt(session, event_id).number == 2


def test_a_2xx_delivers_and_nothing_is_due_after_it(sessions, event_id):
    taken, state = attempt(sessions, Outcome(status_code=204, duration_ms=12))
    assert state == EventState.DELIVERED
    with transaction(sessions) as session:
        assert webhooks.claim_due(session, now=utcnow() + timedelta(days=2)) == []
    [row] = deliveries(sessions, event_id)
    assert (row.attempt, row.status_code, row.error, row.duration_ms) == (1, 204, None, 12)


def test_failures_retry_on_the_schedule_with_jitter_then_fail(sessions, event_id):
    for number, delay in enumerate(DELAYS, start=1):
        before = utcnow()
        taken, state = attempt(sessions, Outcome(status_code=503, error="HTTP 503"))
        assert (taken.number, state) == (number, EventState.PENDING)
        wait = (events(sessions)[0].next_attempt_at - before).total_seconds()
        assert delay * (1 - webhooks.JITTER) - 1 <= wait <= delay * (1 + webhooks.JITTER) + 1
        make_due(sessions, event_id)
    taken, state = attempt(sessions, Outcome(error="no answer: ConnectionRefusedError"))
    assert (taken.number, state) == (len(DELAYS) + 1, EventState.FAILED)
    assert [d.status_code for d in deliveries(sessions, event_id)] == [503, 503, 503, None]
    assert events(sessions)[0].ended_at is not None


def test_410_gone_stops_at_once(sessions, event_id):
    assert attempt(sessions, Outcome(status_code=410, error="HTTP 410"))[1] == EventState.FAILED


def test_a_forbidden_target_at_delivery_fails_at_once(sessions, event_id):
    assert attempt(sessions, Outcome(error="refused: private", final=True))[1] == EventState.FAILED


def test_retry_after_is_honoured_when_longer_than_the_schedule(sessions, event_id):
    before = utcnow()
    attempt(sessions, Outcome(status_code=429, error="HTTP 429", retry_after=120), delays=[1, 1])
    assert (events(sessions)[0].next_attempt_at - before).total_seconds() >= 119


def test_redeliver_sends_the_same_event_again_with_a_fresh_schedule(sessions, event_id):
    attempt(sessions, Outcome(status_code=200))
    with transaction(sessions) as session:
        again = webhooks.redeliver(session, webhooks.events_of(session, job_id=events(sessions)[0].job_id))
    assert (again.id, again.status) == (event_id, "pending")
    taken, state = attempt(sessions, Outcome(status_code=500, error="HTTP 500"), delays=[60])
    assert (taken.number, state) == (2, EventState.PENDING)  # the schedule restarts at its first delay
    with sessions() as session:
        body = session.get(WebhookEvent, event_id).body
    assert json.loads(body)["type"] == "job.completed"


def test_redeliver_without_an_event_says_why(sessions):
    with pytest.raises(webhooks.NoWebhookEventError, match="no webhook_url, or has not ended"):
        with transaction(sessions) as session:
            webhooks.redeliver(session, [])


# --- signatures -------------------------------------------------------------------


def test_headers_verify_with_the_standardwebhooks_library(sessions, event_id):
    with transaction(sessions) as session:
        webhooks.claim_due(session)
        taken = webhooks.start_attempt(session, event_id)
        secret = session.scalar(select(ApiKey.webhook_secret))
    headers = webhooks.signed_headers(taken.event_id, taken.body, taken.secrets)
    assert headers["webhook-id"] == event_id and headers["webhook-signature"].startswith("v1,")
    assert Webhook(secret).verify(taken.body, headers)["type"] == "job.completed"
    with pytest.raises(WebhookVerificationError):
        Webhook(apikeys.new_webhook_secret()).verify(taken.body, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(taken.body.replace("Hello", "Hellp"), headers)


def test_during_a_rotation_both_secrets_sign_and_after_it_only_the_new_one(sessions, owner):
    with sessions() as session:
        old = session.get(ApiKey, owner).webhook_secret
    with transaction(sessions) as session:
        new, until = apikeys.rotate_webhook_secret(session, "alice", grace_hours=2)
    with sessions() as session:
        key = session.get(ApiKey, owner)
        during = webhooks.signed_headers("msg_1", "{}", webhooks.signing_secrets(key))
        after = webhooks.signed_headers("msg_1", "{}", webhooks.signing_secrets(key, now=until + timedelta(seconds=1)))
    assert new != old and len(during["webhook-signature"].split(" ")) == 2
    for secret in (old, new):
        Webhook(secret).verify("{}", during)
    Webhook(new).verify("{}", after)
    with pytest.raises(WebhookVerificationError):
        Webhook(old).verify("{}", after)


def test_rotating_an_unknown_key_says_so(sessions):
    with pytest.raises(InvalidRequestError, match="no key named 'nobody'"):
        with transaction(sessions) as session:
            apikeys.rotate_webhook_secret(session, "nobody")
