"""Fair share in the bulk lane: which waiting chunks of batch rows go to the
broker next.

A batch's chunks wait in the database (``pending``); the broker holds only a
small window of each model's chunks, and as workers take them, the
dispatcher fills the window again from here. The window is at least
``dispatcher.bulk_window`` chunks, and as many as the model's workers took
in the last ``AHEAD_SECONDS``, so fast workers never wait for it, and a
newcomer's chunk waits behind about half a second of work at most. So
the order the workers see is decided late, by share, not at upload:

- each key with bulk work waiting for a model gets a part of that model's
  seats in proportion to its ``share`` (default 1): the next chunk goes to
  the key whose rows in service (running on a worker, or in a chunk on the
  broker) are fewest per unit of share;
- a key's batches share its part the same way (oldest first on a tie), and a
  batch's chunks go in order;
- only keys with waiting work count, so a key that has nothing waiting
  leaves its part to the others: no seat stays empty while work waits.

The reading is of the present, not of history: a key that was idle for an
hour gets no credit for it, and one that had the engine to itself gets no
debt. That is what a shared cluster wants from a batch lane: a colleague's
small batch starts within a few chunks and runs at its share from then on.

Interactive work is not in this: it travels on its own queue, and workers
give it their seats first.
"""

import heapq
import math
from collections import defaultdict, deque
from dataclasses import dataclass, field
from datetime import timedelta

from sqlalchemy import func, or_, select, tuple_

from .dispatch import ChunkState, chunk_transition
from .models import ApiKey, Batch, BatchChunk, Job

#: The window holds about this many seconds of what the workers take.
AHEAD_SECONDS = 0.5
#: Takes are counted over this many seconds.
RATE_SECONDS = 2.0


@dataclass
class Waiting:
    """One batch's pending, due chunks, as the picking sees them."""

    batch_id: str
    owner_id: int
    created_at: object
    chunks: int
    in_service: int = 0
    picked: int = 0


@dataclass
class Tenant:
    """One key's standing for one model: its share and its rows in service."""

    share: float
    in_service: int = 0
    batches: list = field(default_factory=list)


def claim_fair_chunks(session, now, window, chunk_rows):
    """Fill every model's broker window with pending, due chunks, by share,
    and mark them sent now.

    Args:
        window: the fewest chunks of one model the broker may hold at once
            (more while its workers take more: :func:`windows`).
        chunk_rows: rows per chunk (a chunk on the broker counts as that many
            rows in service).

    Returns:
        ``(batch_id, chunk, model)`` of each chunk claimed, for the caller to
        send after commit. The marking is a conditional UPDATE, so two
        dispatchers never send the same chunk in the same round.
    """
    waiting = _waiting_batches(session, now)
    if not waiting:
        return []
    models = sorted(waiting)
    on_broker = _count_chunks(session, models, BatchChunk.state == ChunkState.SENT.value)
    sizes = windows(session, models, now, window)
    claimed = []
    for model in models:
        free = sizes[model] - on_broker.get(model, 0)
        if free > 0:
            picks = pick(_tenants(session, model, waiting[model], chunk_rows), free, chunk_rows)
            claimed += _claim(session, model, picks, now)
    return claimed


def pick(tenants, free, chunk_rows):
    """Choose ``free`` chunks among ``tenants`` (``{owner_id: Tenant}``), one
    at a time, each to the key with the fewest rows in service per unit of
    share, within it to its batch with the fewest (oldest first on a tie).

    Returns:
        The picked batches' ids in the order picked, one per chunk.
    """
    def standing(owner_id):
        tenant = tenants[owner_id]
        return (tenant.in_service / tenant.share, min(b.created_at for b in tenant.batches if b.picked < b.chunks),
                owner_id)

    heap = [standing(owner_id) for owner_id, tenant in tenants.items() if tenant.batches]
    heapq.heapify(heap)
    picks = []
    while heap and free > 0:
        owner_id = heapq.heappop(heap)[-1]
        tenant = tenants[owner_id]
        batch = min((b for b in tenant.batches if b.picked < b.chunks), key=lambda b: (b.in_service, b.created_at))
        batch.picked += 1
        batch.in_service += chunk_rows
        tenant.in_service += chunk_rows
        picks.append(batch.batch_id)
        free -= 1
        if any(b.picked < b.chunks for b in tenant.batches):
            heapq.heappush(heap, standing(owner_id))
    return picks


def windows(session, models, now, least):
    """Each model's window: ``least`` chunks, or what its workers took in the
    last ``AHEAD_SECONDS`` (counted over ``RATE_SECONDS``), if more."""
    since = now - timedelta(seconds=RATE_SECONDS)
    taken = _count_chunks(session, models, BatchChunk.state == ChunkState.TAKEN.value,
                          BatchChunk.dispatched_at >= since)
    return {model: max(least, math.ceil(taken.get(model, 0) * AHEAD_SECONDS / RATE_SECONDS)) for model in models}


def _count_chunks(session, models, *where):
    return dict(session.execute(
        select(BatchChunk.model, func.count()).where(BatchChunk.model.in_(models), *where)
        .group_by(BatchChunk.model)).all())


def _waiting_batches(session, now):
    """``{model: [Waiting]}`` of the batches with pending, due chunks."""
    rows = session.execute(
        select(BatchChunk.model, BatchChunk.batch_id, Batch.owner_id, Batch.created_at, func.count())
        .join(Batch, Batch.id == BatchChunk.batch_id)
        .where(BatchChunk.state == ChunkState.PENDING.value, _due(now))
        .group_by(BatchChunk.model, BatchChunk.batch_id, Batch.owner_id, Batch.created_at)).all()
    waiting = defaultdict(list)
    for model, batch_id, owner_id, created_at, chunks in rows:
        waiting[model].append(Waiting(batch_id, owner_id, created_at, chunks))
    return waiting


def _tenants(session, model, waiting, chunk_rows):
    """``{owner_id: Tenant}`` for the keys with chunks of ``model`` waiting,
    each with its rows in service: running rows, and chunks on the broker."""
    owners = {batch.owner_id for batch in waiting}
    in_service = defaultdict(int)  # (owner_id, batch_id) -> rows
    running = (select(Batch.owner_id, Job.batch_id, func.count()).join(Batch, Batch.id == Job.batch_id)
               .where(Job.status == "running", Job.model == model, Job.batch_id.is_not(None),
                      Batch.owner_id.in_(owners))
               .group_by(Batch.owner_id, Job.batch_id))
    sent = (select(Batch.owner_id, BatchChunk.batch_id, func.count() * chunk_rows)
            .join(Batch, Batch.id == BatchChunk.batch_id)
            .where(BatchChunk.state == ChunkState.SENT.value, BatchChunk.model == model, Batch.owner_id.in_(owners))
            .group_by(Batch.owner_id, BatchChunk.batch_id))
    for query in (running, sent):
        for owner_id, batch_id, rows in session.execute(query):
            in_service[owner_id, batch_id] += rows
    shares = dict(session.execute(select(ApiKey.id, ApiKey.share).where(ApiKey.id.in_(owners))).all())
    tenants = {owner_id: Tenant(share=max(shares.get(owner_id) or 1.0, 1e-6)) for owner_id in owners}
    for (owner_id, _), rows in in_service.items():
        tenants[owner_id].in_service += rows
    for batch in waiting:
        batch.in_service = in_service.get((batch.owner_id, batch.batch_id), 0)
        tenants[batch.owner_id].batches.append(batch)
    return tenants


def _claim(session, model, picks, now):
    """Mark each picked batch's first pending, due chunks sent now; returns
    them in the order picked (the broker's queue keeps it)."""
    moved = {}
    for batch_id in dict.fromkeys(picks):
        chunks = session.scalars(
            select(BatchChunk.chunk)
            .where(BatchChunk.batch_id == batch_id, BatchChunk.state == ChunkState.PENDING.value, _due(now))
            .order_by(BatchChunk.chunk).limit(picks.count(batch_id))).all()
        key = tuple_(BatchChunk.batch_id, BatchChunk.chunk)
        rows = session.execute(
            chunk_transition([ChunkState.PENDING], ChunkState.SENT,
                             [key.in_([(batch_id, chunk) for chunk in chunks])],
                             dispatched_at=now, retry_at=None)
            .returning(BatchChunk.chunk)).scalars().all()
        moved[batch_id] = sorted(rows, reverse=True)
    return [(batch_id, moved[batch_id].pop(), model) for batch_id in picks if moved[batch_id]]


def _due(now):
    return or_(BatchChunk.retry_at.is_(None), BatchChunk.retry_at <= now)


class SeatQueue:
    """Bulk requests waiting in a worker for an engine seat, handed out by the
    same rule: the next seat goes to the tenant (a key) with the fewest
    requests in the engine per unit of share; first come, first served
    within a tenant. Without it a worker's own backlog (it holds rows to keep
    its seats full) would make a newcomer's rows wait behind every row it
    already holds.

    The engine loop calls :meth:`push` as rows arrive, :meth:`pop` when a
    seat is free, and :meth:`left` when a seated request leaves the engine.
    """

    def __init__(self):
        self._waiting = {}  # tenant -> deque of (request_id, entry), in arrival order of tenants
        self._shares = {}
        self._seated = defaultdict(int)
        self._tenant_of = {}  # request id -> tenant, while seated
        self._size = 0

    def __len__(self):
        return self._size

    def push(self, request_id, tenant, share, entry):
        self._waiting.setdefault(tenant, deque()).append((request_id, entry))
        self._shares[tenant] = max(share or 1.0, 1e-6)
        self._size += 1

    def pop(self):
        """The next request's ``entry``, now counted as seated."""
        tenant = min(self._waiting, key=lambda t: self._seated[t] / self._shares[t])
        waiting = self._waiting[tenant]
        request_id, entry = waiting.popleft()
        if not waiting:
            del self._waiting[tenant]
        self._size -= 1
        self._seated[tenant] += 1
        self._tenant_of[request_id] = tenant
        return entry

    def left(self, request_id):
        """A seated request left the engine (it ended, or was aborted)."""
        tenant = self._tenant_of.pop(request_id, None)
        if tenant is not None:
            self._seated[tenant] -= 1
            if not self._seated[tenant]:
                del self._seated[tenant]

    def remove(self, request_id):
        """Take a waiting request out (aborted before it had a seat); its entry, or None."""
        for tenant, waiting in self._waiting.items():
            for position, (waiting_id, entry) in enumerate(waiting):
                if waiting_id == request_id:
                    del waiting[position]
                    if not waiting:
                        del self._waiting[tenant]
                    self._size -= 1
                    return entry
        return None

    def entries(self):
        """Every waiting entry."""
        return [entry for waiting in self._waiting.values() for _, entry in waiting]
