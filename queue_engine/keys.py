"""Every queue name and Redis key the project uses, in one place.

Each model profile has two queues: ``interactive`` (a Celery task per single
job or tribunal) and ``bulk`` (a plain message per chunk of batch rows, taken
by a worker only when its engine has room; see ``workers/bulk.py``).
"""

PREFIX = "qe"
LANES = ("interactive", "bulk")


def queue_name(model, lane="interactive"):
    """The queue of ``model``'s ``lane``.

    >>> queue_name("tiny")
    'qe.tiny.interactive'
    >>> queue_name("tiny", "bulk")
    'qe.tiny.bulk'
    """
    if lane not in LANES:
        raise ValueError(f"unknown lane {lane!r}; choose one of {LANES}")
    return f"{PREFIX}.{model}.{lane}"


def model_queues(model):
    """Both lanes of ``model``, interactive first.

    >>> model_queues("tiny")
    ['qe.tiny.interactive', 'qe.tiny.bulk']
    """
    return [queue_name(model, lane) for lane in LANES]


#: The queue webhook deliveries go to, never a model queue.
WEBHOOK_QUEUE = f"{PREFIX}.webhooks"

#: A key the dispatcher keeps in Redis. When it is gone, Redis lost its data
#: (restarted without persistence, flushed, failed over to an empty replica),
#: and every message it held must be sent again (``queue_engine.dispatch``).
BROKER_MARKER = f"{PREFIX}:broker-marker"

#: Celery task names, so the web can ``send_task`` without importing workers.
RUN_JOB_TASK = "queue_engine.run_job"
DELIVER_WEBHOOK_TASK = "queue_engine.deliver_webhook"


def rate_key(key_id, window_number):
    """The Redis key counting the requests of API key ``key_id`` in one window.

    >>> rate_key(7, 29500000)
    'qe:rate:7:29500000'
    """
    return f"{PREFIX}:rate:{key_id}:{window_number}"


def stream_key(job_id):
    """The Redis Stream of a streamed job's events (``queue_engine.streams``)."""
    return f"{PREFIX}:stream:{job_id}"


def cancel_key(job_id):
    """The flag a streamed job's reader raises when it goes away."""
    return f"{PREFIX}:cancel:{job_id}"
