"""What a worker process holds: its engine loop, database sessions and identity,
and the code that starts a Celery worker around them.
"""

import logging
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass, field

from celery import signals

from queue_engine import allocations, keys, leases, metrics, streams
from queue_engine.broker import Sender
from queue_engine.db import make_sessions, run_transaction, transaction, upgrade_database

from .batcher import EngineLoop
from .bulk import BulkConsumer
from .celery_app import make_celery
from .dispatcher import start_dispatcher
from .engine import EngineSettings, VllmEngine
from .metrics import ENGINE
from .runner import Runner
from .streaming import StreamPublisher
from .webhooks import attach_delivery

log = logging.getLogger(__name__)

#: Seconds a thread that wants the GIL waits before it asks for it (Python's
#: default: 0.005). The engine loop releases the GIL around every tensor
#: operation; with the default it then waits up to 5 ms behind the Celery and
#: runner threads to take it back, hundreds of times a step. Measured on the
#: 2-core machine: single jobs 0.32 of offline speed with the default, 0.60
#: with 0.0005 (0.0001 and 0.001 about the same).
GIL_SWITCH_INTERVAL = 0.0005


@dataclass
class WorkerRuntime:
    settings: object
    model: str
    sessions: object
    loop: EngineLoop
    worker_id: str
    sender: Sender
    #: Publishes streamed jobs' partial output (None: nothing is streamed, as in unit tests).
    publisher: StreamPublisher | None = None
    #: Claims, renews and finishes this worker's work (started with the runtime).
    runner: Runner = field(init=False, repr=False)

    def __post_init__(self):
        self.runner = Runner(self).start()

    def write(self, work):
        """Run ``work(session)`` in a transaction, retried while the database
        is unreachable (for ``database_retry_seconds``)."""
        return run_transaction(self.sessions, work, self.settings.database_retry_seconds)


def load_runtime(celery_app, model, log=log.info):
    """Build the engine for ``model`` once, start its loop, attach it to ``celery_app``."""
    settings = celery_app.qe_settings
    sys.setswitchinterval(GIL_SWITCH_INTERVAL)
    profile = settings.profile(model)
    engine_settings = EngineSettings.from_profile(profile, settings, log=log)
    log(f"loading {model!r} from {engine_settings.model_dir}")
    started = time.monotonic()
    engine = VllmEngine(engine_settings)
    load_seconds = time.monotonic() - started
    sessions = make_sessions(settings.sqlalchemy_url)
    loop = EngineLoop(engine).start()
    ENGINE.watch(settings.autoscaler.deployment, model, loop, load_seconds)
    metrics.initialize(settings, "worker", [model])
    runtime = WorkerRuntime(
        settings=settings,
        model=model,
        sessions=sessions,
        loop=loop,
        worker_id=leases.worker_identity(),
        sender=Sender(celery_app, sessions, settings),
        publisher=StreamPublisher(streams.open_streams(settings), loop).start(),
    )
    celery_app.qe_runtime = runtime
    # Celery's threads pool looks tasks up on the process's default app.
    celery_app.set_default()
    return runtime


def worker_options(settings, model, concurrency=None):
    """The Celery worker options for a worker that serves ``model``'s
    interactive lane (its bulk lane has a consumer of its own: ``bulk.py``)."""
    return {
        "pool": "threads",
        "concurrency": concurrency or settings.profile(model).max_in_flight,
        "queues": [keys.queue_name(model, "interactive")],
        "hostname": f"{model}@%h",
        "without_mingle": True,
        "without_gossip": True,
        "prefetch_multiplier": 1,
    }


def run_worker(celery_app, model, concurrency=None, loglevel="INFO"):
    """Run a Celery worker for ``model`` in this process until it is told to stop.

    SIGTERM is a warm shutdown: the worker stops taking messages in both
    lanes, finishes what it holds and exits; unacknowledged messages go back
    to the queue. Inside a SLURM job the worker marks its allocation
    ``serving`` once its engine is loaded, so the autoscaler can tell a
    loading job from a serving one.
    """
    runtime = load_runtime(celery_app, model)
    bulk = BulkConsumer(celery_app, runtime).start()
    worker = celery_app.Worker(loglevel=loglevel, **worker_options(celery_app.qe_settings, model, concurrency))

    def stop_bulk_lane(**kwargs):
        bulk.stop(wait=False)

    signals.worker_shutting_down.connect(stop_bulk_lane, weak=False)
    register_allocation(runtime)
    try:
        worker.start()
    finally:
        bulk.stop()
        runtime.loop.stop()
        runtime.runner.stop()
    return worker.exitcode


def register_allocation(runtime, environ=os.environ):
    """Inside a SLURM job: mark this job's allocation as serving."""
    job_id = environ.get("SLURM_JOB_ID")
    if not job_id:
        return
    with transaction(runtime.sessions) as session:
        known = allocations.register_worker(session, runtime.settings.autoscaler.deployment, job_id,
                                            node=socket.gethostname())
    if known:
        log.info("serving in SLURM job %s", job_id)
    else:
        log.info("SLURM job %s is not one of the autoscaler's allocations; serving anyway", job_id)


def start_embedded_worker(settings, model, log=log.info):
    """Embedded mode: migrate the database and run a worker for ``model`` in a
    background thread of this process, on the in-process broker, with the
    dispatcher beside it. It delivers webhooks too.

    Call it before Flask is imported: vLLM 0.32 scans every loaded module
    while it starts and trips over werkzeug's unbound context proxies.

    Returns:
        The Celery app, for the web side to enqueue on.
    """
    upgrade_database(settings.sqlalchemy_url)
    celery_app = make_celery(settings)
    runtime = load_runtime(celery_app, model, log=log)
    BulkConsumer(celery_app, runtime).start()
    attach_delivery(celery_app, settings, runtime.sessions)
    start_dispatcher(celery_app, runtime.sessions, settings)
    options = worker_options(settings, model)
    options["queues"].append(keys.WEBHOOK_QUEUE)
    controller = celery_app.WorkController(loglevel="WARNING", without_heartbeat=True, **options)
    threading.Thread(target=controller.start, name="embedded-worker", daemon=True).start()
    return celery_app
