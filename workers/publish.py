"""Putting work on the broker: which message goes to which queue."""

from kombu import Exchange, Queue

from queue_engine import keys


def send_job(app, job):
    """Put a single job on its model's interactive queue.

    A job with ``priority: bulk`` travels there too (the bulk queue carries
    batch chunks only) and takes a bulk seat in the engine, behind batch rows.
    """
    app.send_task(keys.RUN_JOB_TASK, args=[job.id], queue=keys.queue_name(job.model, "interactive"))


def bulk_queue(model):
    """The kombu queue of ``model``'s bulk lane.

    Messages go through the default exchange straight to the queue named by
    the routing key, so no binding has to exist in Redis (a Redis restarted
    without its data still takes them).
    """
    name = keys.queue_name(model, "bulk")
    return Queue(name, Exchange(""), routing_key=name)


def send_chunks(app, batch):
    """Put one message per chunk of ``batch`` on its model's bulk lane."""
    queue = bulk_queue(batch.model)
    with app.producer_or_acquire() as producer:
        for chunk in range(batch.chunks):
            producer.publish(
                {"batch_id": batch.id, "chunk": chunk}, exchange="", routing_key=queue.routing_key,
                serializer="json", retry=True, retry_policy=app.conf.task_publish_retry_policy,
            )
