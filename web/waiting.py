"""Long-poll: ``GET …?wait=S`` answers when the job or batch ends, or after S seconds.

A waiting request costs no database query of its own. One thread per web
process (started when the first request waits) looks every
``wait_interval`` seconds, in one query per kind, at which of the items
waited on have ended, and wakes their waiters. It asks by id, not by "ended
since", so an item that ends between a waiter's first read and its
registration is seen on the next look, and the workers' clocks do not
matter. With nobody waiting the thread sleeps without querying.
"""

import logging
import math
import threading
import time

from flask import current_app, request
from sqlalchemy import select

from queue_engine import batches
from queue_engine.errors import InvalidRequestError
from queue_engine.jobs import FINISHED
from queue_engine.models import Batch, Job

from .db import close_session, get_session

log = logging.getLogger(__name__)

#: Batch states that no longer change: those its state table leads nowhere from.
BATCH_ENDED = frozenset(state for state, moves in batches.ALLOWED.items() if not moves)
#: Ids per ``IN (...)`` query, under every database's parameter limit.
IDS_PER_QUERY = 500
#: What each kind's look selects: its table's id, and the states that end it.
ENDED_QUERIES = {
    "job": (Job.id, Job.status, [state.value for state in FINISHED]),
    "batch": (Batch.id, Batch.status, [state.value for state in BATCH_ENDED]),
}


def wait_seconds(max_wait):
    """The request's ``wait`` parameter in seconds (0 when absent).

    Raises:
        InvalidRequestError: not a number from 0 to ``max_wait``.
    """
    raw = request.args.get("wait")
    if raw is None:
        return 0.0
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not 0 <= seconds <= max_wait:  # also refuses nan
        raise InvalidRequestError(f"wait: {raw!r} is not a number of seconds from 0 to {max_wait:g} (max_wait)",
                                  param="wait")
    return seconds


class EndWatcher:
    """Wakes the requests waiting for items to end; one per web app."""

    def __init__(self, sessions, interval):
        self.sessions, self.interval = sessions, interval
        self._lock = threading.Condition()
        self._waiters = {}  # (kind, id) -> set of Events
        self._thread = None

    def wait(self, kind, item_id, timeout):
        """Block until ``item_id`` of ``kind`` (``job``/``batch``) is seen ended, or ``timeout`` seconds.

        Returns:
            True if it was seen ended, False on timeout.
        """
        key, event = (kind, item_id), threading.Event()
        with self._lock:
            self._waiters.setdefault(key, set()).add(event)
            self._ensure_thread()
            self._lock.notify()
        try:
            return event.wait(timeout)
        finally:
            with self._lock:
                events = self._waiters.get(key)
                if events is not None:
                    events.discard(event)
                    if not events:
                        del self._waiters[key]

    def waiting(self):
        """How many items have a request waiting for them."""
        with self._lock:
            return len(self._waiters)

    def _ensure_thread(self):
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="qe-end-watcher", daemon=True)
            self._thread.start()

    def _run(self):
        while True:
            with self._lock:
                while not self._waiters:
                    self._lock.wait()
                waited = list(self._waiters)
            try:
                ended = self.find_ended(waited)
            except Exception:
                log.warning("could not look for ended items; trying again", exc_info=True)
                ended = set()
            with self._lock:
                for key in ended:
                    for event in self._waiters.pop(key, ()):
                        event.set()
            time.sleep(self.interval)

    def find_ended(self, keys):
        """The ``(kind, id)`` of ``keys`` whose item has ended: one query per kind and 500 ids."""
        ended = set()
        with self.sessions() as session:
            for kind, (id_column, status_column, states) in ENDED_QUERIES.items():
                ids = [item_id for key_kind, item_id in keys if key_kind == kind]
                for start in range(0, len(ids), IDS_PER_QUERY):
                    rows = session.scalars(select(id_column).where(
                        id_column.in_(ids[start:start + IDS_PER_QUERY]), status_column.in_(states)))
                    ended.update((kind, item_id) for item_id in rows)
        return ended


def read_after_wait(kind, read):
    """``read(session)`` the job or batch, and if the request asks ``?wait=S``
    and it has not ended, read it again once it ends or S seconds pass.

    The request's database session is closed while it waits, so a waiting
    request holds no database connection.
    """
    seconds = wait_seconds(current_app.extensions["qe_settings"].max_wait)
    item = read(get_session())
    if seconds and item.status not in ENDED_QUERIES[kind][2]:
        close_session()
        wait_for_end(kind, item.id, seconds)
        item = read(get_session())
    return item


def wait_for_end(kind, item_id, seconds):
    """Wait up to ``seconds`` for ``item_id`` to end, through the app's watcher."""
    watcher = current_app.extensions.get("qe_end_watcher")
    if watcher is None:
        watcher = current_app.extensions.setdefault("qe_end_watcher", EndWatcher(
            current_app.extensions["qe_sessions"], current_app.extensions["qe_settings"].wait_interval))
    return watcher.wait(kind, item_id, seconds)
