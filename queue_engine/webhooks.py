"""Webhook events: recorded with the end they announce, signed, retried, recorded.

The ``webhook_events`` table is an outbox. The transaction that ends a job or
a batch also writes its event, so an event exists exactly when the end was
stored, and a crash cannot lose one or invent one. Then:

    pending --relay--> queued --delivery task--> sending --> delivered
                                                        \\--> pending (retry later)
                                                        \\--> failed (410, schedule used up)

The relay sends a task for each due event; the task claims the event
(``queued -> sending``) before it POSTs, so a duplicated message never sends
twice, and records the attempt. An event held longer than its lease (the
message lost, the sender killed) is sent again by the relay: every event is
delivered at least once, and normally once.

Signing follows Standard Webhooks (https://www.standardwebhooks.com) through
its reference library: ``webhook-id`` is the event's id on every attempt.
"""

import json
import random
from datetime import timedelta
from enum import Enum
from typing import NamedTuple

from sqlalchemy import or_, select
from standardwebhooks.webhooks import Webhook

from .errors import QueueEngineError
from .models import ApiKey, WebhookDelivery, WebhookEvent, new_id, utcnow
from .schemas import WebhookAttempt, WebhookEventOut
from .states import move_statement


class EventState(str, Enum):
    PENDING = "pending"
    QUEUED = "queued"
    SENDING = "sending"
    DELIVERED = "delivered"
    FAILED = "failed"


#: Which state may follow which (the diagram above). -> QUEUED from QUEUED or
#: SENDING: its lease ran out, the relay sends it again. DELIVERED, FAILED
#: (and PENDING) -> PENDING: redelivery asked for through the API.
ALLOWED = {
    EventState.PENDING: {EventState.QUEUED, EventState.PENDING},
    EventState.QUEUED: {EventState.QUEUED, EventState.PENDING, EventState.SENDING},
    EventState.SENDING: {EventState.QUEUED, EventState.PENDING, EventState.DELIVERED, EventState.FAILED},
    EventState.DELIVERED: {EventState.PENDING},
    EventState.FAILED: {EventState.PENDING},
}


JOB_EVENTS = {"succeeded": "job.completed", "failed": "job.failed"}
BATCH_EVENTS = {"completed": "batch.completed", "failed": "batch.failed", "cancelled": "batch.cancelled",
                "expired": "batch.expired"}

#: Seconds a receiver gets to answer.
TIMEOUT = 10.0
#: How long a queued event waits for its message to be taken before the relay sends another.
QUEUED_LEASE = 300.0
#: How long an attempt may take before the relay decides its sender died.
SENDING_LEASE = TIMEOUT + 30.0
#: Each scheduled delay is stretched or shrunk by up to this fraction, so
#: receivers that failed together are not all called again at once.
JITTER = 0.2
#: The longest ``Retry-After`` honoured (one day).
MAX_RETRY_AFTER = 86400.0


class NoWebhookEventError(QueueEngineError):
    """Nothing to redeliver: no webhook_url, or the work has not ended."""

    code = "no_webhook_event"


def event_transition(sources, target, where, **values):
    """The conditional UPDATE that moves every event matching ``where`` from
    one of ``sources`` to ``target`` (``states.move_statement``)."""
    return move_statement(WebhookEvent.status, ALLOWED, sources, target, where, values, "webhook event")


# --- recording (in the transaction that ends a job or batch) -------------------


def record_event(session, owner_id, url, event_type, data, *, job_id=None, batch_id=None):
    """Add the event ``event_type`` about ``data`` (the job or batch object), due now."""
    now = utcnow()
    body = json.dumps({"type": event_type, "timestamp": now.isoformat(), "data": data}, separators=(",", ":"))
    event = WebhookEvent(
        id=new_id("msg"), owner_id=owner_id, job_id=job_id, batch_id=batch_id, type=event_type, url=url,
        body=body, status=EventState.PENDING.value, attempts=0, round_start=0, next_attempt_at=now, created_at=now,
    )
    session.add(event)
    return event


# --- signing -------------------------------------------------------------------


def signing_secrets(api_key, now=None):
    """The secrets to sign with: the key's, and during a rotation's grace period the previous one too."""
    now = now or utcnow()
    secrets = [api_key.webhook_secret]
    if api_key.previous_webhook_secret and api_key.previous_secret_until and api_key.previous_secret_until > now:
        secrets.append(api_key.previous_webhook_secret)
    return secrets


def signed_headers(event_id, body, secrets, now=None):
    """The Standard Webhooks headers; one ``v1,`` signature per secret, space-separated."""
    now = now or utcnow()
    signatures = " ".join(Webhook(secret).sign(event_id, now, body) for secret in secrets)
    return {
        "webhook-id": event_id,
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": signatures,
        "content-type": "application/json",
        "user-agent": "queue-engine-webhooks",
    }


# --- the relay: due events to the delivery queue -------------------------------


def claim_due(session, limit=100, now=None):
    """Mark up to ``limit`` events to be sent now, and return their ids.

    Due means: pending and its time has come; or queued or sending past its
    lease, i.e. its message was lost or its sender died. The claim is one
    conditional UPDATE, so two relays never send the same event.
    """
    now = now or utcnow()
    due = or_(
        (WebhookEvent.status == EventState.PENDING.value) & (WebhookEvent.next_attempt_at <= now),
        WebhookEvent.status.in_([EventState.QUEUED.value, EventState.SENDING.value])
        & (WebhookEvent.lease_expires_at < now),
    )
    candidates = session.scalars(
        select(WebhookEvent.id).where(due).order_by(WebhookEvent.next_attempt_at).limit(limit)).all()
    if not candidates:
        return []
    return list(session.scalars(
        event_transition([EventState.PENDING, EventState.QUEUED, EventState.SENDING], EventState.QUEUED,
                         [WebhookEvent.id.in_(candidates), due],
                         lease_expires_at=now + timedelta(seconds=QUEUED_LEASE))
        .returning(WebhookEvent.id)
    ))


def release(session, event_ids):
    """Put events whose messages could not be sent back to pending."""
    session.execute(event_transition([EventState.QUEUED], EventState.PENDING, [WebhookEvent.id.in_(event_ids)],
                                     lease_expires_at=None))


def forget_queued(session):
    """The broker lost its messages: events waiting in it are due again now
    (not after their lease). Returns how many."""
    statement = event_transition([EventState.QUEUED], EventState.PENDING, [], lease_expires_at=None)
    return session.execute(statement).rowcount


# --- one attempt (the delivery task) ------------------------------------------


class Attempt(NamedTuple):
    """What one attempt sends: the event, its number, where, what, signed how.
    ``round_start`` is where the retry schedule counts from."""

    event_id: str
    number: int
    url: str
    body: str
    secrets: list
    round_start: int = 0


class Outcome(NamedTuple):
    """What came of an attempt: the answer's status code, or an error in words.

    ``final`` marks an error no retry can mend (the target is forbidden);
    ``retry_after`` is the receiver's ``Retry-After`` in seconds.
    """

    status_code: int | None = None
    error: str | None = None
    duration_ms: int = 0
    retry_after: float | None = None
    final: bool = False

    @property
    def delivered(self):
        return self.status_code is not None and 200 <= self.status_code < 300


def start_attempt(session, event_id, now=None):
    """Take a queued event for one attempt; None if it is not ours to send
    (a duplicate message, or an event already delivered)."""
    now = now or utcnow()
    row = session.execute(
        event_transition([EventState.QUEUED], EventState.SENDING, [WebhookEvent.id == event_id],
                         attempts=WebhookEvent.attempts + 1, lease_expires_at=now + timedelta(seconds=SENDING_LEASE))
        .returning(WebhookEvent.attempts, WebhookEvent.url, WebhookEvent.body, WebhookEvent.owner_id,
                   WebhookEvent.round_start)
    ).first()
    if row is None:
        return None
    api_key = session.get(ApiKey, row.owner_id)
    return Attempt(event_id, row.attempts, row.url, row.body, signing_secrets(api_key, now), row.round_start)


def finish_attempt(session, attempt, outcome, retry_delays, now=None):
    """Record ``attempt``'s ``outcome`` and decide what follows.

    2xx: delivered. 410 Gone or a forbidden target: failed, no retry.
    Anything else (429, 5xx, other codes, no answer): again after the next
    delay of ``retry_delays`` (with jitter, and never before ``Retry-After``),
    or failed once the schedule is used up.

    Returns:
        The event's new state.
    """
    now = now or utcnow()
    session.add(WebhookDelivery(
        event_id=attempt.event_id, attempt=attempt.number, status_code=outcome.status_code,
        error=outcome.error, duration_ms=outcome.duration_ms, at=now,
    ))
    ended = {"ended_at": now, "next_attempt_at": None}
    if outcome.delivered:
        target, values = EventState.DELIVERED, ended
    elif outcome.final or outcome.status_code == 410:
        target, values = EventState.FAILED, ended
    else:
        delay = next_delay(attempt.number - attempt.round_start, retry_delays, outcome.retry_after)
        if delay is None:
            target, values = EventState.FAILED, ended
        else:
            target, values = EventState.PENDING, {"next_attempt_at": now + timedelta(seconds=delay)}
    # Only the holder of the current attempt moves the event on.
    session.execute(event_transition(
        [EventState.SENDING], target, [WebhookEvent.id == attempt.event_id, WebhookEvent.attempts == attempt.number],
        lease_expires_at=None, **values))
    return target


def next_delay(attempts_made, retry_delays, retry_after=None):
    """Seconds before the next attempt, after ``attempts_made`` in this round;
    None when the schedule is used up."""
    if attempts_made > len(retry_delays):
        return None
    delay = retry_delays[attempts_made - 1] * random.uniform(1 - JITTER, 1 + JITTER)
    if retry_after is not None:
        delay = max(delay, min(retry_after, MAX_RETRY_AFTER))
    return delay


# --- reading and redelivering (web side) ---------------------------------------


def events_of(session, job_id=None, batch_id=None):
    """The events about a job or a batch (at most one today), oldest first."""
    column, value = (WebhookEvent.job_id, job_id) if job_id is not None else (WebhookEvent.batch_id, batch_id)
    return list(session.scalars(select(WebhookEvent).where(column == value).order_by(WebhookEvent.id)))


def deliveries_of(session, events):
    """Every attempt to deliver ``events``, in order."""
    by_id = {event.id: event for event in events}
    if not by_id:
        return []
    rows = session.scalars(
        select(WebhookDelivery).where(WebhookDelivery.event_id.in_(by_id))
        .order_by(WebhookDelivery.event_id, WebhookDelivery.attempt)
    )
    return [(by_id[row.event_id], row) for row in rows]


def redeliver(session, events, now=None):
    """Send the last of ``events`` again, with the same id and body, and a
    fresh retry schedule. An event still on its way is left to finish.

    Raises:
        NoWebhookEventError: there is no event.
    """
    if not events:
        raise NoWebhookEventError(
            "there is no webhook event to send again: the work has no webhook_url, or has not ended yet")
    event = events[-1]
    now = now or utcnow()
    session.execute(event_transition(
        [EventState.DELIVERED, EventState.FAILED, EventState.PENDING], EventState.PENDING,
        [WebhookEvent.id == event.id],
        next_attempt_at=now, ended_at=None, lease_expires_at=None, round_start=WebhookEvent.attempts))
    session.refresh(event)
    return event


def attempt_to_dict(event, delivery):
    """One attempt as the API shows it (:class:`~queue_engine.schemas.WebhookAttempt`)."""
    return WebhookAttempt(
        webhook_id=event.id, event=event.type, attempt=delivery.attempt, status_code=delivery.status_code,
        error=delivery.error, duration_ms=delivery.duration_ms, at=delivery.at,
    ).model_dump(mode="json")


def event_to_dict(event):
    """An event as the API shows it (:class:`~queue_engine.schemas.WebhookEventOut`)."""
    return WebhookEventOut(
        webhook_id=event.id, event=event.type, url=event.url, status=event.status, attempts=event.attempts,
        next_attempt_at=event.next_attempt_at, created_at=event.created_at, ended_at=event.ended_at,
    ).model_dump(mode="json")
