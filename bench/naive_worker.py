"""The naive baseline: the same Celery worker and tasks, but the engine runs
one prompt at a time (one request per ``generate``), as a worker written
without a batching loop would.

Run as a subprocess by ``throughput.py``: ``python bench/naive_worker.py MODEL``.
"""

import queue
import sys
import threading
from concurrent.futures import Future

from queue_engine import leases
from queue_engine.broker import Sender
from queue_engine.db import make_sessions
from queue_engine.settings import load_settings
from workers.batcher import EngineLoopStopped
from workers.celery_app import make_celery
from workers.engine import EngineSettings, VllmEngine
from workers.runtime import WorkerRuntime, worker_options


class OnePromptAtATime:
    """Same interface as ``EngineLoop``; each request runs alone to the end.

    Requests run on a thread of their own, so ``submit`` returns at once as
    ``EngineLoop``'s does: the worker's runner thread, which submits, must
    go on renewing leases and writing outcomes while prompts run.
    """

    def __init__(self, engine):
        self._engine = engine
        self._requests = queue.SimpleQueue()
        self._aborted = set()
        self._thread = threading.Thread(target=self._run, name="one-prompt-at-a-time", daemon=True)
        self._thread.start()

    def submit(self, request):
        future = Future()
        self._requests.put((request, future))
        return future

    def abort(self, request_id):
        """A request that has not started yet never runs (one that runs ends anyway)."""
        self._aborted.add(request_id)

    def stop(self):
        self._requests.put((None, None))

    def _run(self):
        while True:
            request, future = self._requests.get()
            if request is None:
                break
            if request.request_id in self._aborted:
                self._aborted.discard(request.request_id)
                continue
            try:
                self._engine.add(request)
                while not future.done():
                    for request_id, generation in self._engine.step():
                        future.set_result(generation)
            except Exception as e:
                if not future.done():
                    future.set_exception(e)
        stopped = EngineLoopStopped("the engine loop stopped")
        while True:  # unfinished requests end as errors and go back to the queue
            try:
                _, future = self._requests.get_nowait()
            except queue.Empty:
                return
            if future is not None:
                future.set_exception(stopped)


def main(model):
    settings = load_settings()
    app = make_celery(settings)
    engine = VllmEngine(EngineSettings.from_profile(settings.profile(model), settings))
    sessions = make_sessions(settings.sqlalchemy_url)
    app.qe_runtime = WorkerRuntime(
        settings=settings, model=model, sessions=sessions, loop=OnePromptAtATime(engine),
        worker_id=leases.worker_identity(), sender=Sender(app, sessions, settings),
    )
    app.set_default()
    app.Worker(loglevel="WARNING", **worker_options(settings, model)).start()


if __name__ == "__main__":
    main(sys.argv[1])
