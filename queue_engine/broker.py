"""The broker: the Celery app's configuration, and putting work on the queues.

This module configures a Celery app and sends messages by queue and task
name (``queue_engine.keys``); it registers no task, so the web can send
without importing the worker. ``workers.celery_app`` registers the worker's
tasks on an app built here.

Generations go to the database, never to a Celery result backend. Tasks are
acknowledged late and requeued if their worker dies; the job leases in
``queue_engine.leases`` make a redelivered message safe.

Every queue is reached through the default exchange, straight to the queue
named by the routing key, so no binding has to exist in Redis: a Redis that
restarted without its data takes the messages at once. The bulk lane carries
plain kombu messages, one per chunk of batch rows.

A send never raises for a broker that is down: it returns what it could not
send, and the caller marks that unsent in the database (``queue_engine.dispatch``)
for the dispatcher to send when the broker is back.
"""

import logging
import time

from celery import Celery
from kombu import Exchange, Queue
from kombu.exceptions import KombuError
from redis.exceptions import RedisError

from queue_engine import dispatch, faults, keys
from queue_engine.db import run_transaction

log = logging.getLogger(__name__)

#: What a broker that is down or unreachable raises.
BROKER_ERRORS = (KombuError, RedisError, OSError)
#: Seconds a process stops trying the broker after it refused a send: the
#: dispatcher sends what waits once the broker is back.
PAUSE_AFTER_REFUSAL = 5.0
#: kombu polls the in-process broker once a second unless told otherwise.
MEMORY_POLLING_INTERVAL = 0.005


def make_celery(settings):
    """A configured Celery app for ``settings``, without tasks: Redis in
    cluster mode, in-process when embedded."""
    broker = settings.broker_url or "memory://"
    if settings.is_embedded:
        transport_options = {"polling_interval": MEMORY_POLLING_INTERVAL}
    else:
        transport_options = {
            "visibility_timeout": settings.visibility_timeout,
            # Sweep for a dead worker's messages a few times per timeout, so
            # they come back soon after it expires (kombu's default: 100 s).
            "unacked_restore_interval": max(1, min(10, settings.visibility_timeout / 10)),
            "unacked_restore_throttle": 1,
        }
    app = Celery("queue_engine", broker=broker, set_as_current=False)
    app.conf.update(
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_ignore_result=True,
        # Fail fast when the broker is down, so the web can answer 503 quickly.
        task_publish_retry_policy={"max_retries": 2, "interval_start": 0, "interval_step": 0.2},
        task_serializer="json",
        accept_content=["json"],
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
    )
    app.qe_settings = settings
    return app

class Sender:
    """Sends the messages of jobs a process just committed (the web's
    submissions, a worker's next tribunal steps; batch rows wait for the
    dispatcher's fair share).

    The work was stored marked sent; what the broker refuses is marked unsent
    again, in the database, for the dispatcher. After a refusal the sender
    leaves the broker alone for a few seconds, so that while it is down a
    submission does not wait for it to time out.
    """

    def __init__(self, app, sessions, settings):
        self.app, self.sessions, self.settings = app, sessions, settings
        self._paused_until = 0.0

    def send(self, jobs=()):
        """Send ``(job_id, model)`` jobs; never raises for the broker."""
        faults.crash_point(self.settings, faults.AFTER_COMMIT)
        if time.monotonic() < self._paused_until:
            unsent = [job_id for job_id, _ in jobs]
        else:
            unsent = send_jobs(self.app, jobs)
        if not unsent:
            return True
        self._paused_until = time.monotonic() + PAUSE_AFTER_REFUSAL
        try:
            run_transaction(self.sessions, lambda session: dispatch.release_jobs(session, unsent))
        except Exception:
            # Still marked sent: the dispatcher finds them missing from the broker.
            log.warning("could not mark %d unsent messages in the database", len(unsent), exc_info=True)
        return False


def direct_queue(name):
    """The kombu queue ``name``, reached through the default exchange."""
    return Queue(name, Exchange(""), routing_key=name)


def bulk_queue(model):
    """The kombu queue of ``model``'s bulk lane."""
    return direct_queue(keys.queue_name(model, "bulk"))


def send_jobs(app, jobs):
    """Put one message per job on its model's interactive queue.

    A job with ``priority: bulk`` travels there too (the bulk queue carries
    batch chunks only) and takes a bulk seat in the engine, behind batch rows.

    Args:
        jobs: ``(job_id, model)`` pairs.

    Returns:
        The ids of the jobs that could not be sent; empty when all went.
    """
    def publish(producer, job):
        job_id, model = job
        app.send_task(keys.RUN_JOB_TASK, args=[job_id], queue=direct_queue(keys.queue_name(model)), producer=producer)

    return [job_id for job_id, _ in _send_each(app, jobs, publish, "job")]


def send_chunks(app, chunks):
    """Put one message per chunk of batch rows on its model's bulk queue.

    Args:
        chunks: ``(batch_id, chunk, model)`` triples.

    Returns:
        The triples that could not be sent; empty when all went.
    """
    def publish(producer, chunk):
        batch_id, number, model = chunk
        producer.publish({"batch_id": batch_id, "chunk": number}, exchange="",
                         routing_key=keys.queue_name(model, "bulk"), serializer="json",
                         retry=True, retry_policy=app.conf.task_publish_retry_policy)

    return _send_each(app, chunks, publish, "chunk")


def send_webhook_events(app, event_ids):
    """Put one delivery task per webhook event on ``qe.webhooks``; returns the ids not sent."""
    def publish(producer, event_id):
        app.send_task(keys.DELIVER_WEBHOOK_TASK, args=[event_id], queue=direct_queue(keys.WEBHOOK_QUEUE),
                      producer=producer)

    return _send_each(app, event_ids, publish, "webhook")


def _send_each(app, items, publish, kind):
    """``publish(producer, item)`` each item in order, on one producer; returns
    the items from the first one the broker refused on."""
    items = list(items)
    sent = 0
    try:
        with app.producer_or_acquire() as producer:
            for item in items:
                publish(producer, item)
                sent += 1
    except BROKER_ERRORS as e:
        log.warning("the broker refused %d %s messages (%s: %s); they wait in the database",
                    len(items) - sent, kind, type(e).__name__, e)
    return items[sent:]
