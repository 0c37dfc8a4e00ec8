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

from queue_engine import batches, leases
from queue_engine.db import transaction
from queue_engine.errors import EngineRejectedError

from .publish import bulk_queue
from .engine import GenerationRequest

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

        A chunk that still had rows waiting on another worker goes back to
        the queue. With ``wait=False`` it only begins stopping.
        """
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
        future = self._pool.submit(run_chunk, self.runtime, body["batch_id"], body["chunk"], self._stopping)
        future.add_done_callback(lambda future: self._ended.put((message, future)))

    def _settle_ended_chunks(self, block):
        """Acknowledge the chunks that ended; requeue those that could not."""
        try:
            item = self._ended.get(timeout=POLL_INTERVAL) if block else self._ended.get_nowait()
            while True:
                message, future = item
                self._held -= 1
                error = future.exception()
                if error is None and future.result():
                    message.ack()
                else:
                    if error is not None:
                        log.error("chunk %r failed; it goes back to the queue", message.payload, exc_info=error)
                    message.requeue()
                item = self._ended.get_nowait()
        except queue.Empty:
            pass


def run_chunk(runtime, batch_id, chunk, stopping):
    """Run what is left of one chunk.

    Returns:
        True once every row of the chunk has ended; False if the worker began
        stopping while rows were still held by another worker or waiting to
        be retried (the message should go back to the queue).
    """
    settings = runtime.settings
    while True:
        with transaction(runtime.sessions) as session:
            claim = batches.claim_chunk(session, batch_id, chunk, runtime.worker_id,
                                        settings.lease_seconds, settings.max_attempts)
        if claim.rows:
            if run_rows(runtime, batch_id, claim) and stopping.wait(settings.retry_delay):
                return False
        elif not claim.retry_in:
            return True
        elif stopping.wait(claim.retry_in):
            # Another live worker holds some rows (this message came back
            # early); keep it until they end or their worker is found dead.
            return False


def run_rows(runtime, batch_id, claim):
    """Feed the claimed rows to the engine loop and store their outcomes in
    groups as they finish, renewing the leases of the rest.

    Returns:
        How many rows went back to the queue to be tried again.
    """
    settings = runtime.settings
    rows = {}
    for row in claim.rows:
        request = GenerationRequest(
            request_id=f"{row.id}:{row.attempts}", params={**claim.params, **(row.params or {})},
            prompt=row.prompt, messages=row.messages, lane="bulk",
        )
        rows[runtime.loop.submit(request)] = row
    pending, requeued = set(rows), 0
    renew_at = time.monotonic() + settings.lease_seconds / 3
    while pending:
        ended, pending = wait_for_futures(pending, timeout=FLUSH_INTERVAL)
        if ended:
            requeued += store_outcomes(runtime, batch_id, [(rows[future], future) for future in ended])
        if pending and time.monotonic() >= renew_at:
            with transaction(runtime.sessions) as session:
                batches.renew_leases(session, [rows[future].id for future in pending], runtime.worker_id,
                                     settings.lease_seconds)
            renew_at = time.monotonic() + settings.lease_seconds / 3
    return requeued


def store_outcomes(runtime, batch_id, ended):
    """Write a group of ended rows in one transaction; returns how many were requeued."""
    max_attempts = runtime.settings.max_attempts
    generations, failures, retries = [], [], []
    for row, future in ended:
        error = future.exception()
        if error is None:
            g = future.result()
            generations.append((row.id, g.text, g.finish_reason, g.prompt_tokens, g.completion_tokens))
        elif isinstance(error, EngineRejectedError):
            failures.append((row.id, "engine_rejected", str(error)))
        elif row.attempts < max_attempts:
            retries.append((row.id, f"{type(error).__name__}: {error}"))
        else:
            failures.append((row.id, "engine_error", f"failed after {row.attempts} attempts: {error}"))
    with transaction(runtime.sessions) as session:
        batches.record_outcomes(session, batch_id, runtime.worker_id, generations, failures)
        for job_id, message in retries:
            leases.requeue_job(session, job_id, runtime.worker_id, "engine_error", message)
    return len(retries)
