"""The run_job task's retry policy, with a real Celery worker and the
dispatcher on the in-process broker, and an engine scripted to fail. (The
real engine is exercised by the integration tests; this is about what the
task does when an engine call fails.)"""

import threading

import pytest

from queue_engine import jobs
from queue_engine.db import transaction
from queue_engine.models import Job
from queue_engine.schemas import JobCreate
from queue_engine.broker import Sender, send_jobs
from queue_engine.settings import load_settings
from tests.conftest import make_key
from tests.helpers import wait_until
from workers.batcher import EngineLoop
from workers.celery_app import make_celery
from workers.dispatcher import Dispatcher
from workers.engine import Generation
from workers.runtime import WorkerRuntime, worker_options


class FlakyEngine:
    """Fails its first ``failures`` steps, then finishes every request at once."""

    max_num_seqs = 8

    def __init__(self, failures):
        self.failures = failures
        self.pending = []

    def add(self, request):
        self.pending.append(request.request_id)

    def step(self):
        if self.failures:
            self.failures -= 1
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        done, self.pending = self.pending, []
        return [(request_id, Generation("ok", "stop", 2, 1)) for request_id in done]

    def abort(self, request_id):
        self.pending.remove(request_id)


@pytest.fixture
def run_with_engine(tmp_path, database_url, sessions):
    """Start an in-process worker around ``engine``; returns a function that runs one job."""
    settings = load_settings(environ={}, data_dir=tmp_path, database_url=database_url, retry_delay=0, max_attempts=3)
    owner = make_key(sessions, "alice")[1]
    started = []

    def run(engine):
        app = make_celery(settings)
        loop = EngineLoop(engine, idle_wait=0.01).start()
        app.qe_runtime = WorkerRuntime(settings, "tiny", sessions, loop, "test-worker", Sender(app, sessions, settings))
        app.set_default()
        controller = app.WorkController(loglevel="WARNING", without_heartbeat=True,
                                        **worker_options(settings, "tiny", concurrency=4))
        threading.Thread(target=controller.start, daemon=True).start()
        dispatcher = Dispatcher(app, sessions, settings).start()  # sends each retry after its delay
        started.append((controller, loop, dispatcher))
        with transaction(sessions) as session:
            job, _ = jobs.create_job(session, owner, JobCreate(model="tiny", prompt="hi"), settings)
        send_jobs(app, [(job.id, job.model)])

        def finished():
            with sessions() as session:
                stored = session.get(Job, job.id)
                return stored if stored.status in ("succeeded", "failed") else None

        return wait_until(finished, 30, "the job to finish")

    yield run
    for controller, loop, dispatcher in started:
        dispatcher.stop()
        controller.stop(in_sighandler=False)
        loop.stop()


def test_failed_engine_call_is_retried_with_attempts_counted(run_with_engine):
    """One failed step, then success: the job succeeds on its second attempt."""
    job = run_with_engine(FlakyEngine(failures=1))
    assert (job.status, job.attempts, job.result_text, job.error_code) == ("succeeded", 2, "ok", None)


def test_engine_failing_every_attempt_fails_the_job(run_with_engine):
    """After max_attempts failed calls, the job fails with the engine's error."""
    job = run_with_engine(FlakyEngine(failures=99))
    assert (job.status, job.attempts, job.error_code) == ("failed", 3, "engine_error")
    assert "failed after 3 attempts" in job.error_message and "illegal memory access" in job.error_message
