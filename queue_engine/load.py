"""Load readings: how much work waits for a model, read when a decision needs it.

A model's backlog is counted in requests, per lane, from the database alone
(the broker may have lost its messages, or never been sent some; the
database has not):

- waiting: queued single jobs and tribunal steps of the lane, and for the
  bulk lane the batch rows not yet claimed (each active batch keeps its
  counts on its own row, so a million waiting rows cost one sum);
- reserved: the requests workers have claimed and not finished, i.e. the
  jobs and batch rows that are ``running``.

Each reading is a few index lookups, whatever the size of the backlog.
"""

from sqlalchemy import func, select, text

from .batches import ACTIVE
from .dispatch import ChunkState
from .keys import LANES, queue_name
from .models import WAITING_ALONE, Batch, BatchChunk, Job


def read_backlog(session, models):
    """Read the backlog of every lane of ``models``.

    Returns:
        A JSON-ready dict: ``backlog`` (requests, summed over ``models``) and
        ``queues``: ``{queue name: {waiting, reserved, requests}}``, each in
        requests.
    """
    models = sorted(set(models))
    waiting = _count_by_lane(session, select(Job.model, Job.lane, func.count())
                             .where(Job.model.in_(models), text(WAITING_ALONE)))
    running = _count_by_lane(session, select(Job.model, Job.lane, func.count())
                             .where(Job.model.in_(models), Job.status == "running", Job.kind != "tribunal"))
    running_rows = dict(session.execute(
        select(Job.model, func.count())
        .where(Job.model.in_(models), Job.status == "running", Job.batch_id.is_not(None))
        .group_by(Job.model)).all())
    unfinished_rows = dict(session.execute(
        select(Batch.model, func.sum(Batch.total - Batch.completed - Batch.failed - Batch.cancelled))
        .where(Batch.model.in_(models), Batch.status.in_(ACTIVE))
        .group_by(Batch.model)).all())
    queues = {}
    for model in models:
        for lane in LANES:
            queued = waiting.get((model, lane), 0)
            if lane == "bulk":
                queued += max(0, int(unfinished_rows.get(model) or 0) - running_rows.get(model, 0))
            held = running.get((model, lane), 0)
            queues[queue_name(model, lane)] = {"waiting": queued, "reserved": held, "requests": queued + held}
    return {"backlog": sum(q["requests"] for q in queues.values()), "queues": queues}


def _count_by_lane(session, query):
    return {(model, lane): count for model, lane, count in session.execute(query.group_by(Job.model, Job.lane))}


def read_oldest_waiting(session, models):
    """When the oldest request still waiting in each lane of ``models`` was submitted.

    Jobs that travel alone (single jobs, tribunal steps): the least
    ``created_at`` of the lane's waiting jobs, found through the partial
    index of waiting jobs. Batch rows are stored with their batch, so the
    bulk lane also takes the ``created_at`` of the oldest batch that has a
    chunk no worker has taken yet (the chunks' state index; a chunk whose
    rows must run again is pending again).

    Returns:
        ``{(model, lane): created_at}``, only for lanes where something waits.
    """
    models = sorted(set(models))
    oldest = {(model, lane): at for model, lane, at in session.execute(
        select(Job.model, Job.lane, func.min(Job.created_at))
        .where(Job.model.in_(models), text(WAITING_ALONE)).group_by(Job.model, Job.lane))}
    batches = session.execute(
        select(BatchChunk.model, func.min(Batch.created_at))
        .join(Batch, Batch.id == BatchChunk.batch_id)
        .where(BatchChunk.state.in_([ChunkState.PENDING.value, ChunkState.SENT.value]), BatchChunk.model.in_(models))
        .group_by(BatchChunk.model))
    for model, at in batches:
        known = oldest.get((model, "bulk"))
        oldest[(model, "bulk")] = at if known is None else min(known, at)
    return oldest
