"""Load readings: how much work waits for a model, read when a decision needs it.

A model's backlog is counted in requests, over both of its lanes:

- waiting: the messages in its queues on the broker. An interactive message
  is one request; a bulk message is a chunk of up to ``batches.chunk_rows``
  rows and counts as that many.
- reserved: the requests workers have taken but not finished, i.e. the jobs
  and batch rows the database says are ``running``. (The broker keeps every
  queue's unacknowledged messages in one shared set, which would have to be
  read message by message; the database answers from the status index.)
"""

from sqlalchemy import func, select

from .keys import LANES, queue_name
from .models import Job


def read_backlog(session, channel, models, chunk_rows):
    """Read the backlog of every queue of ``models``.

    Args:
        channel: a broker channel (kombu) whose ``queue_declare`` reports
            ``message_count``; declaring a queue that exists changes nothing.
        models: the model profiles to read.
        chunk_rows: the rows one bulk message carries at most.

    Returns:
        A JSON-ready dict: ``backlog`` (requests, summed over ``models``) and
        ``queues``: ``{queue name: {waiting, reserved, requests}}``, where
        ``waiting`` counts messages and the others count requests.
    """
    models = sorted(set(models))
    reserved = reserved_requests(session, models)
    queues = {}
    for model in models:
        for lane in LANES:
            name = queue_name(model, lane)
            waiting = channel.queue_declare(queue=name).message_count
            held = reserved.get((model, lane), 0)
            per_message = chunk_rows if lane == "bulk" else 1
            queues[name] = {"waiting": waiting, "reserved": held, "requests": waiting * per_message + held}
    return {"backlog": sum(q["requests"] for q in queues.values()), "queues": queues}


def reserved_requests(session, models):
    """``{(model, lane): requests running}`` for ``models``.

    A tribunal's own row is not work for an engine (its steps are), so it is
    left out.
    """
    query = (
        select(Job.model, Job.lane, func.count())
        .where(Job.status == "running", Job.model.in_(models), Job.kind != "tribunal")
        .group_by(Job.model, Job.lane)
    )
    return {(model, lane): count for model, lane, count in session.execute(query)}
