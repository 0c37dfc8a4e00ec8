"""The engine loop: one thread that owns the engine and batches continuously.

Celery runs a few hundred task threads; each hands its request to
:meth:`EngineLoop.submit` and waits on the returned future. The loop thread
adds every new request to the engine before each step, so a request that
arrives while others are generating joins the running batch at the next step
instead of waiting for the whole batch to finish.

Two lanes share the engine. Interactive requests enter it at the next step,
always. Bulk rows (batch chunks) wait in the loop and enter while the engine
runs fewer than ``max_num_seqs - reserve`` requests; the next free seat goes
to the key with the fewest rows in the engine per unit of its share
(``queue_engine.fairshare.SeatQueue``), so a key whose rows just arrived does
not wait behind every row the worker already holds for another.

A full batch makes every step slow (on a CPU, step time grows with the
batch), and an interactive request shares those steps. So while interactive
requests are in the engine, at most ``bulk_seats_with_interactive`` bulk rows
run in each step (the engine holds the others, keeping what they generated);
once none are, bulk rows fill the engine again.

Engine time: each step's wall time is split evenly between the requests that
ran in it, and a finished request's :class:`~workers.engine.Generation`
carries the sum of its shares (``engine_seconds``), so the engine seconds of
all finished requests add up to the engine's busy time
(``qe_engine_busy_seconds_total``), less the shares of requests that were
aborted or failed. The bookkeeping is O(1) per step: the loop keeps a running
total of what one request paid per lane (a step adds its share to it), and a
request pays the difference between the total when it ends and when it entered.

Metrics: the loop adds each step's size and time, and each request that
leaves the engine, to plain numbers (:class:`~workers.metrics.EngineStats`);
Prometheus reads them when it scrapes (``workers/metrics.py``), so no metrics
library runs inside a step.
"""

import dataclasses
import logging
import queue
import threading
import time
from concurrent.futures import Future

from queue_engine.errors import EngineRejectedError
from queue_engine.fairshare import SeatQueue

from .engine import Generation
from .metrics import EngineStats

log = logging.getLogger(__name__)


#: EngineLoop's default bound: the engine's own ``bulk_seats_with_interactive``.
FROM_ENGINE = object()


class EngineLoopStopped(RuntimeError):
    """The loop was stopped before the request finished."""


class EngineLoop:
    """Feeds one engine from many threads.

    Args:
        engine: has ``add(request)``, ``step() -> [(request_id, result)]``,
            ``abort(request_id)`` and ``max_num_seqs``; and, where
            ``bulk_seats_with_interactive`` is not None, ``limit_bulk(n)``
            (from the next step, run at most ``n`` bulk rows, holding the
            others without losing them; ``None`` lifts the bound).
        idle_wait: seconds the thread blocks for new work when it has none.
        reserve: seats of the batch that bulk rows leave to interactive
            requests (default: a sixty-fourth of ``max_num_seqs`` with a
            ``bulk_seats_with_interactive`` bound, else a sixteenth).
        bulk_seats_with_interactive: bulk rows that run in each step while
            interactive requests are in the engine; ``None``: no bound.
            Default: the engine's ``bulk_seats_with_interactive`` attribute
            (VllmEngine takes it from the model profile), else ``None``.
        clock: seconds, to time engine steps (tests pass their own).
        metrics: keep :attr:`stats` (False: none; to measure what they cost,
            ``bench/metrics_overhead.py``).
    """

    def __init__(self, engine, idle_wait=0.05, reserve=None, bulk_seats_with_interactive=FROM_ENGINE,
                 clock=time.perf_counter, metrics=True):
        self._engine = engine
        #: Steps and requests in plain numbers, read by the metrics collector; None when off.
        self.stats = EngineStats() if metrics else None
        self._clock = clock
        self._idle_wait = idle_wait
        if bulk_seats_with_interactive is FROM_ENGINE:
            bulk_seats_with_interactive = getattr(engine, "bulk_seats_with_interactive", None)
        if reserve is None:
            # With the bound an interactive request makes room for itself (the
            # engine holds bulk rows), so few seats need stay empty for it;
            # a few still let it in at the very next step (measured: 1.6x
            # its idle time behind a backlog with 4 of 256 kept, 2.3x with none).
            few = engine.max_num_seqs // (64 if bulk_seats_with_interactive is not None else 16)
            reserve = max(1, few)
        self._bulk_seats = max(1, engine.max_num_seqs - reserve)
        self._bulk_with_interactive = bulk_seats_with_interactive
        self._bulk_limit = None  # the bound the engine was last given
        self._inbox = queue.SimpleQueue()
        # Bulk rows waiting for a seat: the next goes to the key furthest below its share.
        self._bulk_waiting = SeatQueue()
        self._futures = {}
        self._bulk_in_engine = set()
        # Engine seconds one request of each lane has paid since the loop
        # started; a request pays the difference between its end and its entry.
        self._paid = {"interactive": 0.0, "bulk": 0.0}
        self._entered = {}  # request id -> the _paid of its lane when it entered the engine
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)

    def start(self):
        self._thread.start()
        return self

    def stop(self, timeout=10):
        self._stopping.set()
        self._thread.join(timeout)

    @property
    def in_flight(self):
        """Requests in the engine (not counting bulk rows waiting for a seat)."""
        return len(self._futures)

    @property
    def bulk_waiting(self):
        return len(self._bulk_waiting)

    def in_flight_by_lane(self):
        """Requests in the engine per lane (read from another thread: a moment's figures)."""
        bulk = len(self._bulk_in_engine)
        return {"interactive": max(0, len(self._futures) - bulk), "bulk": bulk}

    def submit(self, request):
        """Hand ``request`` to the engine; the future resolves to its result."""
        if self._stopping.is_set():
            raise EngineLoopStopped("the engine loop is stopping; not taking new requests")
        future = Future()
        self._inbox.put(("add", request, future))
        return future

    def abort(self, request_id):
        """Stop generating ``request_id`` (its job was cancelled or lost)."""
        self._inbox.put(("abort", request_id, None))

    def _run(self):
        while not self._stopping.is_set():
            self._take_new_requests(block=not self._futures and not self._bulk_waiting)
            self._seat_bulk_rows()
            self._limit_bulk()
            if self._futures:
                self._step()
        stopped = EngineLoopStopped("the engine loop stopped")
        for future in [*self._futures.values(), *(future for _, future in self._bulk_waiting.entries())]:
            future.set_exception(stopped)

    def _take_new_requests(self, block):
        try:
            item = self._inbox.get(timeout=self._idle_wait) if block else self._inbox.get_nowait()
            while True:
                self._handle(*item)
                item = self._inbox.get_nowait()
        except queue.Empty:
            pass

    def _handle(self, action, payload, future):
        if action == "abort":
            self._abort(payload)
        elif payload.lane == "bulk":
            self._bulk_waiting.push(payload.request_id, payload.tenant, payload.share, (payload, future))
        else:
            self._add(payload, future)

    def _abort(self, request_id):
        if self._futures.pop(request_id, None) is not None:
            lane = "bulk" if request_id in self._bulk_in_engine else "interactive"
            self._left_engine(request_id)
            self._entered.pop(request_id, None)
            self._engine.abort(request_id)
            self._count(lane, "aborted")
        elif self._bulk_waiting.remove(request_id) is not None:
            self._count("bulk", "aborted")

    def _seat_bulk_rows(self):
        while self._bulk_waiting and len(self._futures) < self._bulk_seats:
            self._add(*self._bulk_waiting.pop())

    def _limit_bulk(self):
        """Bound the bulk rows in each step while interactive requests are in the engine."""
        if self._bulk_with_interactive is None:
            return
        interactive = len(self._futures) > len(self._bulk_in_engine)
        limit = self._bulk_with_interactive if interactive else None
        if limit != self._bulk_limit:
            self._engine.limit_bulk(limit)
            self._bulk_limit = limit

    def _add(self, payload, future):
        try:
            self._engine.add(payload)
        except EngineRejectedError as e:
            self._count(payload.lane, "rejected")
            self._bulk_waiting.left(payload.request_id)
            future.set_exception(e)
            return
        self._futures[payload.request_id] = future
        if payload.lane == "bulk":
            self._bulk_in_engine.add(payload.request_id)
            self._entered[payload.request_id] = self._paid["bulk"]
        else:
            self._entered[payload.request_id] = self._paid["interactive"]

    def _step(self):
        batch = min(len(self._futures), self._engine.max_num_seqs)
        started = self._clock()
        try:
            finished = self._engine.step()
        except Exception as e:
            if self.stats is not None:
                self.stats.step(batch, self._clock() - started)
            # A broken step fails everything in it; the tasks decide on retries.
            log.exception("engine step failed with %d requests in flight", len(self._futures))
            for request_id, future in self._futures.items():
                self._engine.abort(request_id)
                future.set_exception(e)
            bulk = len(self._bulk_in_engine)
            self._count("bulk", "error", bulk)
            self._count("interactive", "error", len(self._futures) - bulk)
            for request_id in list(self._bulk_in_engine):
                self._left_engine(request_id)
            self._futures.clear()
            self._entered.clear()
        else:
            seconds = self._clock() - started
            if self.stats is not None:
                self.stats.step(batch, seconds)
            self._pay(seconds)
            for request_id, result in finished:
                lane = "bulk" if request_id in self._bulk_in_engine else "interactive"
                self._left_engine(request_id)
                future = self._futures.pop(request_id, None)
                if future is not None:
                    self._count(lane, "finished")
                    entered = self._entered.pop(request_id, self._paid[lane])
                    future.set_result(with_engine_seconds(result, self._paid[lane] - entered))

    def _left_engine(self, request_id):
        """A request is out of the engine (ended, aborted or failed): a bulk row frees its key's seat."""
        if request_id in self._bulk_in_engine:
            self._bulk_in_engine.discard(request_id)
            self._bulk_waiting.left(request_id)

    def _pay(self, seconds):
        """Split one step's ``seconds`` evenly between the requests that ran in it.

        Under a bulk bound only ``limit`` of the bulk rows run (the engine
        holds the others, and the loop does not know which), so the bulk rows
        together pay for that many seats, each an equal part; what every
        request paid still adds up to ``seconds``.
        """
        bulk = len(self._bulk_in_engine)
        interactive = len(self._futures) - bulk
        running_bulk = bulk if self._bulk_limit is None else min(bulk, self._bulk_limit)
        if interactive + running_bulk == 0:
            running_bulk = bulk  # a bound of 0 with nothing else in the engine: the rows are all there is
        if interactive + running_bulk == 0:
            return
        share = seconds / (interactive + running_bulk)
        self._paid["interactive"] += share
        if bulk:
            self._paid["bulk"] += share * running_bulk / bulk

    def _count(self, lane, outcome, count=1):
        """Count requests that left the engine (or never entered it: rejected, aborted while waiting)."""
        if self.stats is not None and count:
            self.stats.ended(lane, outcome, count)


def with_engine_seconds(result, seconds):
    """``result`` carrying its ``engine_seconds`` (a :class:`Generation`; other results pass as they are)."""
    if isinstance(result, Generation):
        return dataclasses.replace(result, engine_seconds=seconds)
    return result
