"""A worker's metrics (``queue-engine worker --metrics-port``); the names are
``queue_engine.metrics``'s.

The engine loop must not slow down for its metrics, so it never touches
``prometheus_client``: it adds to plain numbers in an :class:`EngineStats`
(a few integer additions per step), and :class:`EngineCollector` turns them
into Prometheus families when a scrape asks. Outcomes, tokens and latencies
are counted by the runner thread once the transaction that stored them has
committed (:func:`count_claimed`, :func:`count_finished`), so a counter
never counts what the database did not keep.
"""

import time
from bisect import bisect_left

from prometheus_client import REGISTRY

from queue_engine import metrics
from queue_engine.metrics import FIRST_TOKEN, JOBS_ENDED, JOBS_SUBMITTED, QUEUE_WAIT, TOKENS, TOTAL_TIME, kind_of


class Buckets:
    """A histogram in plain numbers: a count per bucket and the sum."""

    def __init__(self, bounds):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last: above every bound
        self.sum = 0.0

    def observe(self, value):
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def cumulative(self):
        """``[(le, count)]`` as Prometheus writes buckets, ending with ``+Inf``."""
        counts, total, out = list(self.counts), 0, []
        for bound, count in zip([*map(str, map(float, self.bounds)), "+Inf"], counts):
            total += count
            out.append((bound, total))
        return out


class EngineStats:
    """What the engine loop counts: steps, their time and size, and the
    requests that left the engine. Only the loop's thread writes it."""

    def __init__(self):
        self.step_seconds = Buckets(metrics.STEP_SECONDS_BUCKETS)
        self.batch_size = Buckets(metrics.BATCH_SIZE_BUCKETS)
        self.busy_seconds = 0.0
        self.requests = {}  # (lane, outcome) -> count

    def step(self, batch, seconds):
        self.batch_size.observe(batch)
        self.step_seconds.observe(seconds)
        self.busy_seconds += seconds

    def ended(self, lane, outcome, count=1):
        key = (lane, outcome)
        self.requests[key] = self.requests.get(key, 0) + count


class EngineCollector:
    """The engine figures of the loops this process runs, read at scrape time."""

    def __init__(self):
        self._watched = []  # (deployment, model, loop, load_seconds)

    def watch(self, deployment, model, loop, load_seconds):
        """Expose ``loop``'s figures (its ``stats``) as ``model``'s."""
        self._watched.append((deployment, model, loop, load_seconds))

    def describe(self):
        return []

    def collect(self):
        if not self._watched:
            return
        names = (metrics.ENGINE_IN_FLIGHT, metrics.ENGINE_BULK_WAITING, metrics.ENGINE_REQUESTS, metrics.ENGINE_BUSY,
                 metrics.ENGINE_STEP, metrics.ENGINE_BATCH, metrics.ENGINE_LOAD)
        in_flight, waiting, requests, busy, step, batch, load = map(metrics.family, names)
        for deployment, model, loop, load_seconds in self._watched:
            load.add_metric([deployment, model], load_seconds)
            lanes = loop.in_flight_by_lane()
            for lane in ("interactive", "bulk"):
                in_flight.add_metric([deployment, model, lane], lanes[lane])
            waiting.add_metric([deployment, model], loop.bulk_waiting)
            stats = loop.stats
            if stats is None:
                continue
            for (lane, outcome), count in sorted(dict(stats.requests).items()):
                requests.add_metric([deployment, model, lane, outcome], count)
            busy.add_metric([deployment, model], stats.busy_seconds)
            for family, buckets in ((step, stats.step_seconds), (batch, stats.batch_size)):
                cumulative = buckets.cumulative()
                family.add_metric([deployment, model], cumulative, buckets.sum)
        yield from (in_flight, waiting, requests, busy, step, batch, load)


#: Registered once per process; ``workers.runtime.load_runtime`` makes it watch the loop.
ENGINE = EngineCollector()
REGISTRY.register(ENGINE)


def count_claimed(deployment, items):
    """Items a committed claim took: a job's queue wait, at its first start."""
    for item in items:
        if item.attempts == 1 and item.created_at is not None and item.started_at is not None:
            QUEUE_WAIT.labels(deployment, item.model, item.lane, kind_of(item)).observe(
                max(0.0, (item.started_at - item.created_at).total_seconds()))


def count_finished(deployment, outcomes, finished, now=None):
    """Outcomes a committed :func:`queue_engine.leases.finish` stored.

    Args:
        outcomes: the ``Outcome`` s it was given.
        finished: what it returned (``Finished``): only the items in
            ``ended`` count; the others went back to the queue or were no
            longer this worker's.
    """
    now = time.time() if now is None else now
    ended, failed = set(finished.ended), set(finished.failed)
    for outcome in outcomes:
        item = outcome.item
        if item.id not in ended:
            continue
        ended.discard(item.id)  # each item once
        kind = kind_of(item)
        JOBS_ENDED.labels(deployment, item.model, item.lane, kind, "failed" if item.id in failed else "succeeded").inc()
        generation = outcome.generation
        if generation is None:
            continue
        TOKENS.labels(deployment, item.model, item.lane).inc(generation.completion_tokens)
        if item.created_at is None:
            continue
        created = item.created_at.timestamp()
        TOTAL_TIME.labels(deployment, item.model, item.lane, kind).observe(max(0.0, now - created))
        first_token_at = getattr(generation, "first_token_at", None)
        if first_token_at is not None:
            FIRST_TOKEN.labels(deployment, item.model, item.lane, kind).observe(max(0.0, first_token_at - created))
    for _, model in finished.next_jobs:
        JOBS_SUBMITTED.labels(deployment, model, "interactive", "tribunal_step").inc()
