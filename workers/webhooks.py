"""Delivering webhook events: the Celery task that makes one attempt.

The dispatcher (``dispatcher.py``) sends a task for each due event to the
``qe.webhooks`` queue. The delivery queue is never a model queue, so a GPU
worker never waits on a slow receiver: ``serve`` runs a threads-pool worker
for it (in embedded mode the in-process worker takes the queue as well).
What an event is, how it is signed and when it is retried is in
``queue_engine/webhooks.py``; this module only speaks HTTP.
"""

import logging
import threading
import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from urllib.parse import urlsplit

import urllib3
from queue_engine import keys, targets, webhooks
from queue_engine.db import transaction
from queue_engine.metrics import WEBHOOK_ATTEMPTS
from queue_engine.models import utcnow

log = logging.getLogger(__name__)

#: Task threads of a delivery worker: attempts in flight at once.
DELIVERY_THREADS = 16
#: The most of a receiver's answer that is read (it is not used).
MAX_ANSWER_BYTES = 65536


@dataclass
class DeliveryContext:
    """What the delivery task needs, attached to the Celery app as ``qe_webhooks``."""

    settings: object
    sessions: object


def register_tasks(app):
    app.task(name=keys.DELIVER_WEBHOOK_TASK, bind=True, shared=False)(deliver_webhook)


def deliver_webhook(task, event_id):
    """Make one attempt to deliver ``event_id`` and record what came of it."""
    context = task.app.qe_webhooks
    with transaction(context.sessions) as session:
        attempt = webhooks.start_attempt(session, event_id)
    if attempt is None:
        return  # a duplicate message, or the event is already delivered
    outcome = post_event(attempt, context.settings.webhook_networks)
    with transaction(context.sessions) as session:
        state = webhooks.finish_attempt(session, attempt, outcome, context.settings.webhook_retry_delays)
    WEBHOOK_ATTEMPTS.labels(context.settings.autoscaler.deployment, state.value).inc()
    log.info("webhook %s attempt %d to %s: %s -> %s", event_id, attempt.number, attempt.url,
             outcome.status_code or outcome.error, state.value)


def post_event(attempt, allow, timeout=webhooks.TIMEOUT):
    """POST the attempt's body, signed, to its URL; never raises.

    The host is resolved and checked again here, and the request goes to the
    address that passed the check (so a second lookup cannot swap in a
    private one). Redirects are not followed.
    """
    started = time.monotonic()

    def outcome(**fields):
        return webhooks.Outcome(duration_ms=round((time.monotonic() - started) * 1000), **fields)

    try:
        target = targets.check_url(attempt.url, allow)
    except targets.UnresolvableTargetError as e:
        return outcome(error=str(e))
    except targets.ForbiddenTargetError as e:
        return outcome(error=f"refused: {e}", final=True)
    headers = {**webhooks.signed_headers(attempt.event_id, attempt.body, attempt.secrets),
               "host": urlsplit(attempt.url).netloc.rpartition("@")[2]}
    try:
        status, retry_after = _post(target, headers, attempt.body.encode(), timeout)
    except urllib3.exceptions.HTTPError as e:
        return outcome(error=f"no answer: {_reason(e)}")
    error = None if 200 <= status < 300 else f"HTTP {status}"
    return outcome(status_code=status, error=error, retry_after=retry_after)


def _post(target, headers, body, timeout):
    address = str(target.addresses[0])
    options = {"timeout": urllib3.Timeout(total=timeout), "retries": False, "maxsize": 1}
    if target.scheme == "https":
        pool = urllib3.HTTPSConnectionPool(address, target.port, server_hostname=target.host,
                                           assert_hostname=target.host, **options)
    else:
        pool = urllib3.HTTPConnectionPool(address, target.port, **options)
    with pool:
        response = pool.urlopen("POST", target.path, body=body, headers=headers, redirect=False,
                                assert_same_host=False, preload_content=False)
        try:
            response.read(MAX_ANSWER_BYTES)
        finally:
            response.release_conn()
        return response.status, retry_after_seconds(response.headers.get("Retry-After"))


def _reason(error):
    reason = getattr(error, "reason", None) or error
    return f"{type(reason).__name__}: {reason}"


def retry_after_seconds(value, now=None):
    """``Retry-After`` (seconds, or an HTTP date) in seconds from now; None if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, (when - (now or utcnow())).total_seconds())


def attach_delivery(celery_app, settings, sessions):
    """Give ``celery_app``'s delivery tasks what they need; its worker must
    consume ``qe.webhooks`` (see :func:`start_delivery`)."""
    celery_app.qe_webhooks = DeliveryContext(settings, sessions)


def start_delivery(celery_app, settings, sessions, concurrency=DELIVERY_THREADS):
    """Cluster mode: a threads-pool worker for ``qe.webhooks`` in a
    background thread of this process (``serve`` runs it)."""
    attach_delivery(celery_app, settings, sessions)
    celery_app.set_default()  # the threads pool looks tasks up on the default app
    controller = celery_app.WorkController(
        pool="threads", concurrency=concurrency, queues=[keys.WEBHOOK_QUEUE], hostname="webhooks@%h",
        without_heartbeat=True, without_mingle=True, without_gossip=True, prefetch_multiplier=1,
        loglevel="WARNING",
    )
    threading.Thread(target=controller.start, name="webhook-delivery", daemon=True).start()
    return controller
