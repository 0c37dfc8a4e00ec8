"""Streamed jobs on the worker: their partial output goes out as the engine
produces it, and their readers' cancels come back (``queue_engine.streams``).

The engine loop must not wait on the network, so it only hands each step's
new text to :class:`StreamPublisher`, whose thread publishes what gathered
in one round trip (merging a job's deltas that arrived meanwhile) and, a few
times a second, asks which streamed jobs their reader gave up on and aborts
them in the engine.
"""

import logging
import queue
import threading
import time

log = logging.getLogger(__name__)

#: Seconds between looks at the cancel flags of the streamed jobs running here.
CANCEL_CHECK_INTERVAL = 0.2


class StreamPublisher:
    """Publishes the events of the streamed jobs this worker runs."""

    def __init__(self, streams, loop):
        self.streams, self.loop = streams, loop
        self._inbox = queue.SimpleQueue()
        self._running = {}  # job id -> engine request id, from start to end
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stream-publisher", daemon=True)

    def start(self):
        self._thread.start()
        return self

    def stop(self, timeout=5):
        self._stopping.set()
        self._thread.join(timeout)

    def started(self, item):
        """``item`` (a :class:`~queue_engine.leases.Item`) goes into the engine;
        returns the ``on_delta`` callback for its :class:`~workers.engine.GenerationRequest`."""
        self._inbox.put((item.id, item.request_id, {"type": "start", "attempt": item.attempts}))

        def on_delta(deltas):
            choices = [{"index": index, "text": text, "logprobs": logprobs} for index, text, logprobs in deltas]
            self._inbox.put((item.id, None, {"type": "delta", "attempt": item.attempts, "choices": choices}))

        return on_delta

    def ended(self, item, generation):
        """The attempt ended: with its ``generation``, or (None) without an answer."""
        if generation is None:
            event = {"type": "error", "attempt": item.attempts}
        else:
            choices = (generation.output or {}).get("choices") or [{"finish_reason": generation.finish_reason}]
            event = {"type": "end", "attempt": item.attempts,
                     "finish_reasons": [choice["finish_reason"] for choice in choices],
                     "prompt_tokens": generation.prompt_tokens, "completion_tokens": generation.completion_tokens}
        self._inbox.put((item.id, None, event))

    # --- the thread --------------------------------------------------------

    def _run(self):
        check_at = time.monotonic() + CANCEL_CHECK_INTERVAL
        while not self._stopping.is_set():
            events = self._gather(timeout=max(0.0, check_at - time.monotonic()))
            if events:
                self._guard(self.streams.publish, events)
            if time.monotonic() >= check_at:
                self._guard(self._abort_cancelled)
                check_at = time.monotonic() + CANCEL_CHECK_INTERVAL

    def _gather(self, timeout):
        """The events waiting (blocking up to ``timeout`` for the first), a job's
        consecutive deltas merged into one."""
        events, last_delta = [], {}
        try:
            entry = self._inbox.get(timeout=timeout)
            while True:
                job_id, request_id, event = entry
                if event["type"] == "start":
                    self._running[job_id] = request_id
                elif event["type"] in ("end", "error"):
                    self._running.pop(job_id, None)
                merged = last_delta.get(job_id)
                if event["type"] == "delta" and merged is not None and merged["attempt"] == event["attempt"]:
                    merge_choices(merged["choices"], event["choices"])
                else:
                    events.append((job_id, event))
                    last_delta[job_id] = event if event["type"] == "delta" else None
                entry = self._inbox.get_nowait()
        except queue.Empty:
            pass
        return events

    def _abort_cancelled(self):
        if not self._running:
            return
        for job_id in self.streams.cancelled(list(self._running)):
            request_id = self._running.pop(job_id, None)
            if request_id is not None:
                log.info("job %s: its reader went away; aborting it", job_id)
                self.loop.abort(request_id)

    @staticmethod
    def _guard(step, *args):
        """A broker that is away loses hints, never work: the reader falls back to the database."""
        try:
            step(*args)
        except Exception:
            log.warning("could not reach the stream carrier; readers will read the database", exc_info=True)


def merge_choices(into, choices):
    """Append ``choices``' new text (and logprobs) to ``into``'s, choice by choice."""
    by_index = {choice["index"]: choice for choice in into}
    for choice in choices:
        known = by_index.get(choice["index"])
        if known is None:
            into.append(choice)
            by_index[choice["index"]] = choice
            continue
        known["text"] += choice["text"]
        if choice["logprobs"]:
            known["logprobs"] = (known["logprobs"] or []) + choice["logprobs"]
