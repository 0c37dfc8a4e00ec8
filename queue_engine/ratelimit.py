"""Requests per minute per key: a fixed one-minute window counter.

In cluster mode the counter lives in Redis (the broker's server), so every
web process of the service counts against the same number: one pipelined
``INCR`` + ``EXPIRE`` per request of a key that has a limit, and nothing for
a key without one. In embedded mode (one process) it is a dict in memory.

A fixed window lets a key send up to twice its limit across the boundary
of two windows; it is the price of one round trip per request instead of a
sorted set per key. If Redis cannot be reached, requests are let through
(logged): an outage of the broker refuses no work elsewhere either.
"""

import logging
import math
import threading
import time

import redis

from .errors import RateLimitedError
from .keys import rate_key

log = logging.getLogger(__name__)

#: The window, seconds; ``requests_per_minute`` counts requests per window.
WINDOW_SECONDS = 60


class RateLimiter:
    """Counts requests per key and window; :meth:`count` is the storage's part.

    Args:
        window: seconds per window.
        clock: wall-clock seconds, the same in every process (tests pass their own).
    """

    def __init__(self, window=WINDOW_SECONDS, clock=time.time):
        if window <= 0:
            raise ValueError(f"window must be above 0 seconds, not {window!r}")
        self.window, self.clock = window, clock

    def check(self, identity):
        """Count one request of ``identity`` (a :class:`~queue_engine.apikeys.KeyIdentity`).

        Raises:
            RateLimitedError: over its ``requests_per_minute`` in this window,
                with ``retry_after`` the seconds to the window's end.
        """
        limit = identity.requests_per_minute
        if limit is None:
            return
        now = self.clock()
        window_number = int(now // self.window)
        count = self.count(identity.id, window_number)
        if count is None or count <= limit:
            return
        retry_after = max(1, math.ceil((window_number + 1) * self.window - now))
        raise RateLimitedError(
            f"requests_per_minute: this key may send {limit} requests a minute, and this is its request "
            f"{count} of this minute (refused ones count too); try again in {retry_after} s", retry_after)

    def count(self, key_id, window_number):
        """Add one to the counter and return it (None: unknown, let it through)."""
        raise NotImplementedError


class RedisRateLimiter(RateLimiter):
    """The counters in Redis, shared by every web process."""

    def __init__(self, url, window=WINDOW_SECONDS, clock=time.time, max_connections=100):
        super().__init__(window, clock)
        self._redis = redis.Redis.from_url(url, max_connections=max_connections, socket_timeout=2,
                                           socket_connect_timeout=2)

    def count(self, key_id, window_number):
        name = rate_key(key_id, window_number)
        pipe = self._redis.pipeline(transaction=False)
        pipe.incr(name)
        pipe.expire(name, 2 * self.window)  # gone soon after its window
        try:
            count, _ = pipe.execute()
        except redis.RedisError as e:
            log.warning("rate limit not checked, Redis unavailable: %s", e)
            return None
        return count


class LocalRateLimiter(RateLimiter):
    """The counters in this process (embedded mode: the only web process)."""

    def __init__(self, window=WINDOW_SECONDS, clock=time.time):
        super().__init__(window, clock)
        self._window_number, self._counts = None, {}
        self._lock = threading.Lock()

    def count(self, key_id, window_number):
        with self._lock:
            if window_number != self._window_number:
                self._window_number, self._counts = window_number, {}
            count = self._counts[key_id] = self._counts.get(key_id, 0) + 1
        return count


def open_rate_limiter(settings):
    """Redis on the broker's server in cluster mode; in-process when embedded."""
    if settings.is_embedded:
        return LocalRateLimiter()
    return RedisRateLimiter(settings.broker_url, max_connections=settings.web_threads + 16)
