"""Partial output of streamed jobs, from the worker that runs them to the web
request that streams them to the client (``stream: true`` on ``/v1``).

A streamed job's events, in order, each a dict with ``type`` and ``attempt``:

- ``start``: the worker put the attempt into its engine;
- ``delta``: ``{index, text}`` new text of choice ``index`` (and ``logprobs``
  of its tokens when the request asked for them);
- ``end``: the engine finished the attempt (``finish_reasons``, ``prompt_tokens``,
  ``completion_tokens``);
- ``error``: the attempt ended without an answer; the job's row says what
  happens next (a retry starts a new attempt, or the job failed).

The database stays the record: an event is only ever a hint that arrives
sooner. Events live a few minutes; a stream nobody reads expires.

The reader can also ask the worker to stop: :meth:`cancel` raises a flag the
worker's publisher checks a few times a second, so a client that went away
frees its seat in the engine at once, not at the next lease renewal.

Cluster mode carries this through Redis (a Stream per job, read from its
start with XREAD BLOCK); embedded mode, where web and worker share one
process, through :class:`LocalStreams`.
"""

import json
import threading
import time

import redis

from .keys import cancel_key, stream_key

#: Seconds a job's events and cancel flag live after their last write.
TTL_SECONDS = 300
#: Events kept per job (a longer answer drops its oldest deltas; the reader
#: then takes the rest of the text from the database).
MAX_EVENTS = 100_000


class RedisStreams:
    """Job streams on Redis (cluster mode).

    Each waiting reader blocks on a connection of its own, so the pool holds
    one per web thread (``max_connections``; redis-py's default is 100).
    """

    def __init__(self, url, max_connections=100):
        self._redis = redis.Redis.from_url(url, max_connections=max_connections)

    def publish(self, events):
        """Append ``events``, a list of ``(job_id, event)``, in one round trip."""
        pipe = self._redis.pipeline(transaction=False)
        for job_id, event in events:
            pipe.xadd(stream_key(job_id), {"e": json.dumps(event)}, maxlen=MAX_EVENTS, approximate=True)
        for job_id in {job_id for job_id, _ in events}:
            pipe.expire(stream_key(job_id), TTL_SECONDS)
        pipe.execute()

    def read(self, job_id, after, timeout):
        """The events after position ``after`` (``"0"`` for all), waiting up to
        ``timeout`` seconds for one: ``(events, position of the last)``."""
        answer = self._redis.xread({stream_key(job_id): after}, block=max(1, int(timeout * 1000)))
        if not answer:
            return [], after
        entries = answer[0][1]
        return [json.loads(fields[b"e"]) for _, fields in entries], entries[-1][0].decode()

    def cancel(self, job_id):
        self._redis.set(cancel_key(job_id), 1, ex=TTL_SECONDS)

    def cancelled(self, job_ids):
        """Those of ``job_ids`` whose reader asked to stop."""
        job_ids = list(job_ids)
        if not job_ids:
            return set()
        flags = self._redis.mget([cancel_key(job_id) for job_id in job_ids])
        return {job_id for job_id, flag in zip(job_ids, flags) if flag is not None}


class LocalStreams:
    """Job streams inside one process (embedded mode)."""

    def __init__(self):
        self._changed = threading.Condition()
        self._events = {}  # job id -> list of events
        self._cancelled = set()
        self._touched = {}  # job id -> monotonic time of its last write

    def publish(self, events):
        with self._changed:
            now = time.monotonic()
            for job_id, event in events:
                self._events.setdefault(job_id, []).append(event)
                self._touched[job_id] = now
            self._forget_old(now)
            self._changed.notify_all()

    def read(self, job_id, after, timeout):
        """As :meth:`RedisStreams.read`; positions are list offsets as text."""
        start = int(after)
        deadline = time.monotonic() + timeout
        with self._changed:
            while len(self._events.get(job_id, ())) <= start:
                left = deadline - time.monotonic()
                if left <= 0:
                    return [], after
                self._changed.wait(left)
            events = self._events[job_id][start:]
        return events, str(start + len(events))

    def cancel(self, job_id):
        with self._changed:
            self._cancelled.add(job_id)
            self._touched[job_id] = time.monotonic()

    def cancelled(self, job_ids):
        with self._changed:
            return self._cancelled.intersection(job_ids)

    def _forget_old(self, now):
        old = [job_id for job_id, at in self._touched.items() if now - at > TTL_SECONDS]
        for job_id in old:
            self._events.pop(job_id, None)
            self._cancelled.discard(job_id)
            del self._touched[job_id]


#: The one in-process carrier of embedded mode, shared by its web and its worker.
_local = LocalStreams()


def open_streams(settings):
    """Redis on the broker's server in cluster mode; in-process when embedded."""
    if settings.is_embedded:
        return _local
    return RedisStreams(settings.broker_url, max_connections=settings.web_threads + 16)
