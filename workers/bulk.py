"""The bulk lane: chunks of batch rows, taken only when the engine has room.

Why a small kombu consumer and not a Celery task: a Celery worker reserves
as many messages as it has threads, whatever their queue. A worker with a few
hundred threads for interactive jobs would fill them all with bulk chunks
(each many rows), and an interactive job would wait for a whole chunk to end
before it even got a thread. This consumer holds at most ``max_chunks``
chunks (enough rows to keep the engine's bulk seats full twice over), takes
the next one when a chunk ends, and acknowledges a chunk once every row in it
has ended. The rows themselves are claimed, run and stored by the worker's
:class:`~workers.runner.Runner`, as every other kind of work is. A chunk
whose worker died is never acknowledged: its rows' leases expire and the
dispatcher puts them back in the queue (``queue_engine.recovery``).
"""

import logging
import math
import queue
import socket
import threading

from queue_engine.broker import bulk_queue

log = logging.getLogger(__name__)

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
        future = self.runtime.runner.run(chunks=[(body["batch_id"], body["chunk"])])
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

