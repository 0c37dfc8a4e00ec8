"""The Celery app, built from the same Settings as everything else.

Generations go to the database, never to a Celery result backend. Tasks are
acknowledged late and requeued if their worker dies; the job leases in
``queue_engine.leases`` make a redelivered message safe.

The bulk lane carries plain kombu messages, one per chunk of batch rows, on
the same broker connection settings; ``workers/bulk.py`` explains why a
worker consumes it itself. What goes on which queue is in ``publish.py``.
"""

from celery import Celery

from . import tasks, webhooks

#: kombu polls the in-process broker once a second unless told otherwise.
MEMORY_POLLING_INTERVAL = 0.005


def make_celery(settings):
    """A Celery app for ``settings``: Redis in cluster mode, in-process when embedded."""
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
    tasks.register_tasks(app)
    webhooks.register_tasks(app)
    return app
