"""The naive baseline: the same Celery worker and tasks, but the engine runs
one prompt at a time (one request per ``generate``), as a worker written
without a batching loop would.

Run as a subprocess by ``throughput.py``: ``python bench/naive_worker.py MODEL``.
"""

import sys
import threading
from concurrent.futures import Future

from queue_engine import leases
from queue_engine.db import make_sessions
from queue_engine.errors import EngineRejectedError
from queue_engine.settings import load_settings
from workers.celery_app import make_celery
from workers.engine import EngineSettings, VllmEngine
from workers.publish import Sender
from workers.runtime import WorkerRuntime, worker_options


class OnePromptAtATime:
    """Same interface as ``EngineLoop``; each request runs alone to the end."""

    def __init__(self, engine):
        self._engine = engine
        self._lock = threading.Lock()

    def submit(self, request):
        future = Future()
        with self._lock:
            try:
                self._engine.add(request)
            except EngineRejectedError as e:
                future.set_exception(e)
                return future
            while not future.done():
                for request_id, generation in self._engine.step():
                    future.set_result(generation)
        return future

    def abort(self, request_id):
        pass

    def stop(self):
        pass


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
