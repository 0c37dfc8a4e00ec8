"""The bulk lane: chunks of batch rows, taken only when the engine has room.

Why a small kombu consumer and not a Celery task: a Celery worker reserves
as many messages as it has threads, whatever their queue. A worker with a few
hundred threads for interactive jobs would fill them all with bulk chunks
(each many rows), and an interactive job would wait for a whole chunk to end
before it even got a thread. This consumer holds at most ``max_chunks``
chunks (enough rows to keep the engine's bulk seats full twice over), takes
the next one when a chunk ends, and acknowledges a chunk once every row in it
has ended. A chunk whose worker died is never acknowledged: Redis hands it out
again after the visibility timeout, and the row leases make that safe
(finished rows are skipped, rows of a live worker are left to it).
"""

import logging
import math
import queue
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as wait_for_futures

from queue_engine import batches
from queue_engine.db import try_transaction
from queue_engine.errors import EngineRejectedError
from queue_engine.models import Job

from .engine import GenerationRequest
from .publish import bulk_queue

log = logging.getLogger(__name__)

#: Finished rows are written in groups, at most this many seconds apart.
FLUSH_INTERVAL = 0.25
#: How long one look for a new chunk, or for a held chunk to end, blocks.
POLL_INTERVAL = 0.1


class BulkConsumer:
    """Takes chunk messages from one model's bulk lane and runs them on ``runtime``.

    Args:
        app: the Celery app (for its broker connection and transport options).
        runtime: the worker's :class:`~workers.runtime.WorkerRuntime`.
        max_chunks: chunks held at once; by default enough for twice the
            profile's ``max_in_flight`` rows.
    """

    def __init__(self, app, runtime, max_chunks=None):
        settings = runtime.settings
        rows = 2 * settings.profile(runtime.model).max_in_flight
        self.app = app
        self.runtime = runtime
        self.max_chunks = max_chunks or max(2, math.ceil(rows / settings.batches.chunk_rows))
        self._pool = ThreadPoolExecutor(self.max_chunks, thread_name_prefix="bulk-chunk")
        self._ended = queue.SimpleQueue()
        self._held = 0
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bulk-consumer", daemon=True)

    def start(self):
        self._thread.start()
        return self

    def stop(self, timeout=None, wait=True):
        """Warm stop: take no more chunks, finish the rows already running.
        With ``wait=False`` it only begins stopping."""
        self._stopping.set()
        if wait:
            self._thread.join(timeout)
            self._pool.shutdown(wait=False)

    def _run(self):
        while not self._stopping.is_set():
            try:
                with self.app.connection_for_read() as connection:
                    self._consume(connection)
                return
            except Exception:
                if self._stopping.is_set():
                    return
                log.exception("the bulk lane's broker connection failed; reconnecting")
                self._stopping.wait(1.0)

    def _consume(self, connection):
        consumer = connection.Consumer(bulk_queue(self.runtime.model), callbacks=[self._take], accept=["json"])
        with consumer:
            while True:
                full = self._stopping.is_set() or self._held >= self.max_chunks
                self._settle_ended_chunks(block=full)
                if self._stopping.is_set() and not self._held:
                    return
                if full:
                    continue
                try:
                    connection.drain_events(timeout=POLL_INTERVAL)
                except (socket.timeout, TimeoutError):
                    pass

    def _take(self, body, message):
        if not (isinstance(body, dict) and isinstance(body.get("batch_id"), str) and isinstance(body.get("chunk"), int)):
            log.error("dropping a bulk-lane message that is not a chunk: %r", body)
            message.ack()
            return
        self._held += 1
        future = self._pool.submit(run_chunk, self.runtime, body["batch_id"], body["chunk"])
        future.add_done_callback(lambda future: self._ended.put((message, future)))

    def _settle_ended_chunks(self, block):
        """Acknowledge the chunks that ended; requeue those that failed."""
        try:
            item = self._ended.get(timeout=POLL_INTERVAL) if block else self._ended.get_nowait()
            while True:
                message, future = item
                self._held -= 1
                error = future.exception()
                if error is None:
                    message.ack()
                else:
                    log.error("chunk %r failed; it goes back to the queue", message.payload, exc_info=error)
                    message.requeue()
                item = self._ended.get_nowait()
        except queue.Empty:
            pass


def run_chunk(runtime, batch_id, chunk):
    """Run the queued rows of one chunk to their outcomes."""
    settings = runtime.settings
    claim = runtime.write(lambda session: batches.claim_chunk(
        session, batch_id, chunk, runtime.worker_id, settings.lease_seconds))
    if claim.rows:
        run_rows(runtime, batch_id, claim)


def run_rows(runtime, batch_id, claim):
    """Feed the claimed rows to the engine loop and store their outcomes in
    groups as they finish, renewing the leases of the rest."""
    settings = runtime.settings
    rows = {}
    for row in claim.rows:
        request = GenerationRequest(
            request_id=f"{row.id}:{row.attempts}", params={**claim.params, **(row.params or {})},
            prompt=row.prompt, messages=row.messages, lane="bulk",
        )
        rows[runtime.loop.submit(request)] = row
    pending = set(rows)
    renew_at = time.monotonic() + settings.lease_seconds / 3
    while pending:
        ended, pending = wait_for_futures(pending, timeout=FLUSH_INTERVAL)
        if ended:
            store_outcomes(runtime, batch_id, [(rows[future], future) for future in ended])
        if pending and time.monotonic() >= renew_at:
            renew_leases(runtime, [rows[future].id for future in pending])
            renew_at = time.monotonic() + settings.lease_seconds / 3


def renew_leases(runtime, job_ids):
    """Extend the rows' leases; skipped while the database is unreachable
    (the outcomes are stored once it is back)."""
    try_transaction(runtime.sessions, lambda session: batches.renew_leases(
        session, job_ids, runtime.worker_id, runtime.settings.lease_seconds))


def store_outcomes(runtime, batch_id, ended):
    """Write a group of ended rows in one transaction: results, failures,
    and rows to be tried again (back to the queue, their chunks sent again
    after ``retry_delay``)."""
    settings = runtime.settings
    generations, failures, retries = [], [], []
    for row, future in ended:
        error = future.exception()
        if error is None:
            g = future.result()
            generations.append((row.id, g.text, g.finish_reason, g.prompt_tokens, g.completion_tokens))
        elif isinstance(error, EngineRejectedError):
            failures.append((row.id, "engine_rejected", str(error)))
        elif row.attempts < settings.max_attempts:
            retries.append((row.id, f"{type(error).__name__}: {error}"))
        else:
            failures.append((row.id, "engine_error", f"failed after {row.attempts} attempts: {error}"))

    def store(session):
        batches.record_outcomes(session, batch_id, runtime.worker_id, generations, failures)
        for job_id, message in retries:
            batches.requeue_rows(session, batch_id, [Job.id == job_id, Job.lease_owner == runtime.worker_id],
                                 settings.retry_delay, error_code="engine_error", error_message=message)

    runtime.write(store)
