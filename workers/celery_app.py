"""The worker's Celery app: the broker's app (``queue_engine.broker``) with
the worker's tasks registered on it.

The bulk lane carries plain kombu messages, one per chunk of batch rows;
``workers/bulk.py`` explains why a worker consumes it itself. What goes on
which queue is in ``queue_engine/broker.py``.
"""

from queue_engine import broker

from . import tasks, webhooks


def make_celery(settings):
    """The Celery app for ``settings`` with the worker's and webhook delivery's tasks registered."""
    app = broker.make_celery(settings)
    tasks.register_tasks(app)
    webhooks.register_tasks(app)
    return app
