"""The worker's runner (``workers/runner.py``) groups what arrives together:
jobs handed over while it is busy are claimed in one transaction, and
outcomes that end while it is busy are stored in one. Real database (SQLite
and PostgreSQL), a scripted engine behind the real engine loop."""

import threading

import pytest

from queue_engine import jobs, leases
from queue_engine.broker import Sender, make_celery
from queue_engine.db import transaction
from queue_engine.models import Job
from queue_engine.schemas import JobCreate
from queue_engine.settings import load_settings
from tests.conftest import make_key
from tests.helpers import wait_until
from workers.batcher import EngineLoop
from workers.engine import Generation
from workers.runtime import WorkerRuntime

JOBS = 40


class HeldEngine:
    """Finishes nothing until ``release`` is set, then every request in one step."""

    max_num_seqs = 64

    def __init__(self):
        self.pending, self.release = [], threading.Event()

    def add(self, request):
        self.pending.append(request.request_id)

    def step(self):
        if not self.release.wait(0.01):
            return []
        done, self.pending = self.pending, []
        return [(request_id, Generation("ok", "stop", 2, 1)) for request_id in done]

    def abort(self, request_id):
        self.pending.remove(request_id)


class Gate:
    """Wraps a protocol call so its first call waits until ``open`` is set,
    and counts the items each call got."""

    def __init__(self, monkeypatch, name, size):
        self.real, self.size = getattr(leases, name), size
        self.open, self.entered, self.sizes = threading.Event(), threading.Event(), []
        monkeypatch.setattr(leases, name, self)

    def __call__(self, session, *args, **kwargs):
        self.sizes.append(self.size(args, kwargs))
        self.entered.set()
        assert self.open.wait(30), "the gate was never opened"
        return self.real(session, *args, **kwargs)


@pytest.fixture
def runtime(tmp_path, database_url, sessions):
    settings = load_settings(environ={}, data_dir=tmp_path, database_url=database_url)
    app = make_celery(settings)
    engine = HeldEngine()
    loop = EngineLoop(engine, idle_wait=0.01).start()
    runtime = WorkerRuntime(settings, "tiny", sessions, loop, "w1", Sender(app, sessions, settings))
    runtime.engine = engine
    yield runtime
    engine.release.set()
    runtime.runner.stop()
    loop.stop()


def new_jobs(runtime, count):
    owner = make_key(runtime.sessions, "alice")[1]
    with transaction(runtime.sessions) as session:
        created = [jobs.create_job(session, owner, JobCreate(model="tiny", prompt=f"q{n}"), runtime.settings)[0]
                   for n in range(count)]
    return [job.id for job in created]


def statuses(runtime, job_ids):
    with runtime.sessions() as session:
        return [session.get(Job, job_id).status for job_id in job_ids]


def test_jobs_that_arrive_while_the_runner_claims_are_claimed_together(runtime, monkeypatch):
    """The first job's claim is held open while the others arrive: they are
    all claimed in the next transaction, not one by one."""
    gate = Gate(monkeypatch, "claim", lambda args, kwargs: len(kwargs["job_ids"]))
    first, *others = new_jobs(runtime, JOBS)
    futures = [runtime.runner.run(job_ids=[first])]
    assert gate.entered.wait(10)
    futures += [runtime.runner.run(job_ids=[job_id]) for job_id in others]
    gate.open.set()
    wait_until(lambda: sum(gate.sizes) == JOBS, 10, "every job claimed")
    assert gate.sizes == [1, JOBS - 1]
    runtime.engine.release.set()
    for future in futures:
        future.result(timeout=10)
    assert statuses(runtime, [first, *others]) == ["succeeded"] * JOBS


def test_outcomes_that_end_together_are_stored_in_one_transaction(runtime, monkeypatch):
    """Every job ends in the same engine step; the runner, held in its first
    finish until all outcomes are in, stores the rest in one more."""
    gate = Gate(monkeypatch, "finish", lambda args, kwargs: len(args[1]))
    job_ids = new_jobs(runtime, JOBS)
    futures = [runtime.runner.run(job_ids=job_ids)]
    wait_until(lambda: runtime.runner.held == JOBS, 10, "every job claimed")
    runtime.engine.release.set()
    assert gate.entered.wait(10)
    wait_until(lambda: runtime.runner._inbox.qsize() == JOBS - gate.sizes[0], 10,
               "the other outcomes waiting for the runner", 0.01)
    gate.open.set()
    futures[0].result(timeout=10)
    assert sum(gate.sizes) == JOBS and len(gate.sizes) <= 2
    assert statuses(runtime, job_ids) == ["succeeded"] * JOBS
