"""The worker's half of the run protocol (``queue_engine.leases``): one thread
that claims, renews and finishes work in groups, and feeds the engine loop.

The transports hand it work and wait: a Celery task hands it one job, the
bulk consumer a chunk of batch rows. Whatever arrives while the thread is
busy is claimed in the next transaction, so under load one transaction
claims many items and one finishes many; lease renewals are one statement
for everything the worker holds. Interactive outcomes are written at once;
bulk rows wait up to ``BULK_FLUSH_INTERVAL`` to be written in larger groups.

The thread is the only one that writes to the database for the worker's
work, so database writes never compete with each other inside a worker.
While the database is away (restarting) claims and outcomes are retried for
``database_retry_seconds`` (``WorkerRuntime.write``); renewals are skipped.
"""

import logging
import queue
import threading
import time
from concurrent.futures import Future

from queue_engine import leases
from queue_engine.db import try_transaction

from . import metrics
from .engine import GenerationRequest

log = logging.getLogger(__name__)

#: Ended bulk rows are written in groups, at most this many seconds apart.
BULK_FLUSH_INTERVAL = 0.25
#: Outcomes written in one transaction, at most.
MAX_GROUP = 512


class Work:
    """What one transport handed over (a job, a chunk): its future resolves
    once every item it claimed has ended, been put back or been lost."""

    def __init__(self, job_ids=(), chunks=()):
        self.job_ids, self.chunks = list(job_ids), list(chunks)
        self.future = Future()
        self.remaining = 0

    def release_one(self):
        self.remaining -= 1
        if self.remaining == 0:
            self.future.set_result(None)


class Runner:
    """Runs work for ``runtime`` (a :class:`~workers.runtime.WorkerRuntime`)."""

    def __init__(self, runtime):
        self.runtime = runtime
        self._inbox = queue.SimpleQueue()
        self._held = {}  # job id -> (item, work)
        self._outcomes = []  # ended, not yet written
        self._oldest_outcome = None
        self._renew_at = 0.0
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="runner", daemon=True)

    def start(self):
        self._renew_at = time.monotonic() + self.runtime.settings.lease_seconds / 3
        self._thread.start()
        return self

    def stop(self, timeout=10):
        """Write what ended and stop (after the engine loop stopped, its
        unfinished requests end as errors and go back to the queue)."""
        self._stopping.set()
        self._inbox.put(("wake", None))
        self._thread.join(timeout)

    @property
    def held(self):
        """How many items this worker runs now."""
        return len(self._held)

    def run(self, job_ids=(), chunks=()):
        """Claim and run the queued jobs among ``job_ids`` and the rows of the
        ``(batch_id, chunk)`` chunks.

        Returns:
            A future that resolves once all of it has ended and been stored;
            at once if nothing was queued (a duplicate message).
        """
        work = Work(job_ids, chunks)
        self._inbox.put(("claim", work))
        return work.future

    # --- the thread --------------------------------------------------------

    def _run(self):
        while True:
            claims = self._take_inbox()
            if self._outcomes and (self._stopping.is_set() or self._flush_due()):
                self._guard(self._finish)
            if claims:
                self._guard(self._claim, claims)
            if time.monotonic() >= self._renew_at:
                self._guard(self._renew)
            if self._stopping.is_set() and self._inbox.empty() and not self._outcomes:
                return

    def _take_inbox(self):
        """Everything waiting in the inbox (blocking until something comes
        or a flush or renewal is due); returns the claims among it."""
        claims = []
        try:
            item = self._inbox.get(timeout=self._wait_time())
            while True:
                kind, payload = item
                if kind == "claim":
                    claims.append(payload)
                elif kind == "ended":
                    self._collect(*payload)
                item = self._inbox.get_nowait()
        except queue.Empty:
            pass
        return claims

    def _wait_time(self):
        due = self._renew_at
        if self._oldest_outcome is not None:
            due = min(due, self._oldest_outcome + BULK_FLUSH_INTERVAL)
        return max(0.0, min(due - time.monotonic(), 1.0))

    def _collect(self, item, future):
        if item.id not in self._held:
            return  # lost while it ran; its outcome is not ours to write
        error = future.exception()
        outcome = leases.Outcome(item, None if error else future.result(), error)
        self._outcomes.append(outcome)
        if item.lane == "interactive":
            self._oldest_outcome = 0.0  # write at once
        elif self._oldest_outcome is None:
            self._oldest_outcome = time.monotonic()

    def _flush_due(self):
        return (len(self._outcomes) >= MAX_GROUP
                or time.monotonic() >= self._oldest_outcome + BULK_FLUSH_INTERVAL)

    def _guard(self, step, *args):
        """Run one step; a failure (the database away for longer than we
        wait) fails the work it concerned, and the thread goes on."""
        try:
            step(*args)
        except Exception:
            log.exception("the runner's %s failed", step.__name__.strip("_"))

    def _claim(self, works):
        runtime = self.runtime
        job_ids = [job_id for work in works for job_id in work.job_ids]
        chunks = [chunk for work in works for chunk in work.chunks]
        try:
            items = runtime.write(lambda session: leases.claim(
                session, runtime.worker_id, runtime.settings.lease_seconds, job_ids=job_ids, chunks=chunks))
        except Exception as e:
            for work in works:
                work.future.set_exception(e)
            raise
        metrics.count_claimed(runtime.settings.autoscaler.deployment, items)
        owner = {job_id: work for work in works for job_id in work.job_ids}
        owner.update({chunk: work for work in works for chunk in work.chunks})
        for item in items:
            work = owner[item.id] if item.batch_id is None else owner[(item.batch_id, item.chunk)]
            work.remaining += 1
            self._held[item.id] = (item, work)
        for work in works:
            if work.remaining == 0:
                work.future.set_result(None)
        for item in items:
            self._submit(item)

    def _submit(self, item):
        on_delta = None
        if item.stream and self.runtime.publisher is not None:
            on_delta = self.runtime.publisher.started(item)
        request = GenerationRequest(request_id=item.request_id, params=item.params, prompt=item.prompt,
                                    messages=item.messages, lane=item.lane, tenant=item.owner_id, share=item.share,
                                    on_delta=on_delta)
        try:
            future = self.runtime.loop.submit(request)
        except Exception as e:
            future = Future()
            future.set_exception(e)
        future.add_done_callback(lambda future: self._inbox.put(("ended", (item, future))))

    def _finish(self):
        runtime = self.runtime
        outcomes, self._outcomes, self._oldest_outcome = self._outcomes, [], None
        try:
            finished = runtime.write(lambda session: leases.finish(
                session, runtime.worker_id, outcomes, runtime.settings))
        finally:
            for outcome in outcomes:
                self._release(outcome.item.id)
        metrics.count_finished(runtime.settings.autoscaler.deployment, outcomes, finished)
        self._announce_streamed_ends(outcomes)
        if finished.next_jobs:
            runtime.sender.send(jobs=finished.next_jobs)

    def _announce_streamed_ends(self, outcomes):
        """Interactive jobs' readers learn of the end once it is stored (what a
        reader then reads of the job agrees with what it streamed); a reader
        that waits for the whole answer wakes on it too, sooner than a look at
        the database would find it."""
        publisher = self.runtime.publisher
        if publisher is not None:
            for outcome in outcomes:
                if outcome.item.stream or outcome.item.lane == "interactive":
                    publisher.ended(outcome.item, outcome.generation)

    def _renew(self):
        runtime = self.runtime
        lease = runtime.settings.lease_seconds
        self._renew_at = time.monotonic() + lease / 3
        if not self._held:
            return
        lost = try_transaction(runtime.sessions, lambda session: leases.renew(
            session, runtime.worker_id, list(self._held), lease))
        for job_id in lost or ():
            item, _ = self._held[job_id]
            runtime.loop.abort(item.request_id)
            if item.stream and runtime.publisher is not None:
                runtime.publisher.ended(item, None)
            self._release(job_id)

    def _release(self, job_id):
        held = self._held.pop(job_id, None)
        if held is not None:
            held[1].release_one()

