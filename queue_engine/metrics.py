"""Every Prometheus metric queue-engine exposes, in one catalogue.

Each metric is defined here once: name, type, help, labels and which
processes expose it. The web, the workers and the autoscaler import their
metrics from this module, so a name is never spelled twice, and the README's
table is checked against :data:`CATALOGUE` (``tests/unit/test_metrics_docs.py``).

Every metric carries the ``deployment`` label (``autoscaler.deployment``),
so several deployments can share one Prometheus; ``model`` and ``lane``
(interactive, bulk) where they mean something.

Two kinds of entries:

- counted metrics (:func:`instrument`): a ``prometheus_client`` object in the
  default registry, updated where the thing happens;
- collected metrics (:func:`define` only): read when Prometheus scrapes, by
  a collector that yields a family built with :func:`family`. The queue's
  depth comes from the database (:class:`QueueCollector`, here); the engine
  loop's figures from plain numbers the loop keeps (``workers/metrics.py``),
  so the loop never calls into ``prometheus_client`` while it steps.

With several web processes (``serve --workers N``, gunicorn) the counters
live in files under ``PROMETHEUS_MULTIPROC_DIR`` and every scrape sums them
(:func:`exposition`); see ``queue_engine/cli.py`` ``serve``.
"""

import logging
import os
from typing import NamedTuple

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from . import load
from .keys import LANES, queue_name
from .models import utcnow

log = logging.getLogger(__name__)

# The *_created series double every counter's output and are lost in
# multiprocess mode anyway; the rate of a counter is all a dashboard needs.
disable_created_metrics()

#: The type of scrape answers (for the web's ``/metrics``).
CONTENT_TYPE = CONTENT_TYPE_LATEST

#: Where a process counts into when several share their counters (gunicorn).
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

#: Default ports of the processes that serve metrics on a port of their own.
WORKER_PORT = 9320
AUTOSCALER_PORT = 9321

STEP_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
#: From a fast interactive answer to a batch row that waited a day.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
                   7200.0, 21600.0, 86400.0)


class Metric(NamedTuple):
    """One catalogue entry. ``labels`` start with ``deployment``; ``exposed_by``
    names the processes whose scrape shows it (web, worker, autoscaler)."""

    name: str
    type: str
    help: str
    labels: tuple
    exposed_by: tuple
    buckets: tuple | None = None


#: Every metric, in the order the README lists them.
CATALOGUE = []


def define(name, type, help, labels=(), exposed_by=("web",), buckets=None):
    """Add a metric to the catalogue; returns its :class:`Metric`."""
    metric = Metric(name, type, help, ("deployment", *labels), tuple(exposed_by), buckets)
    CATALOGUE.append(metric)
    return metric


def instrument(metric):
    """The ``prometheus_client`` object that counts ``metric`` (in the default registry)."""
    if metric.type == "counter":
        return Counter(metric.name.removesuffix("_total"), metric.help, metric.labels)
    if metric.type == "histogram":
        return Histogram(metric.name, metric.help, metric.labels, buckets=metric.buckets)
    return Gauge(metric.name, metric.help, metric.labels)


def family(metric):
    """An empty family for a collector to add ``metric``'s samples to."""
    labels = list(metric.labels)
    if metric.type == "counter":
        return CounterMetricFamily(metric.name, metric.help, labels=labels)
    if metric.type == "histogram":
        return HistogramMetricFamily(metric.name, metric.help, labels=labels)
    return GaugeMetricFamily(metric.name, metric.help, labels=labels)


# --- the queue (web; read from the database) ------------------------------------

QUEUE_DEPTH = define(
    "qe_queue_depth", "gauge",
    "Requests waiting for a worker (queued jobs, tribunal steps and batch rows not yet claimed), from the database",
    ("model", "lane"))
QUEUE_RUNNING = define(
    "qe_queue_running", "gauge", "Requests workers have claimed and not yet ended, from the database",
    ("model", "lane"))
QUEUE_OLDEST = define(
    "qe_queue_oldest_waiting_seconds", "gauge",
    "Age of the oldest request still waiting for a worker (0 when none waits), from the database",
    ("model", "lane"))

# --- jobs: what was submitted, how it ended, how long it took -------------------

JOBS_SUBMITTED = instrument(define(
    "qe_jobs_submitted_total", "counter",
    "Jobs stored, by kind: single (a job or /v1 request), tribunal_step, batch_item (a batch's rows, "
    "counted when the batch is stored)",
    ("model", "lane", "kind"), ("web", "worker")))
JOBS_ENDED = instrument(define(
    "qe_jobs_ended_total", "counter",
    "Jobs that ended, by kind and outcome (succeeded, failed, cancelled); counted once the end is committed",
    ("model", "lane", "kind", "outcome"), ("web", "worker")))
QUEUE_WAIT = instrument(define(
    "qe_job_queue_wait_seconds", "histogram", "From a job's submission to its first start on a worker",
    ("model", "lane", "kind"), ("worker",), LATENCY_BUCKETS))
FIRST_TOKEN = instrument(define(
    "qe_job_first_token_seconds", "histogram",
    "From a job's submission to its first generated token (jobs that got an answer)",
    ("model", "lane", "kind"), ("worker",), LATENCY_BUCKETS))
TOTAL_TIME = instrument(define(
    "qe_job_total_seconds", "histogram", "From a job's submission to its answer being stored (jobs that got an answer)",
    ("model", "lane", "kind"), ("worker",), LATENCY_BUCKETS))
TOKENS = instrument(define(
    "qe_tokens_generated_total", "counter",
    "Completion tokens of the answers stored (the sum of the jobs' completion_tokens)",
    ("model", "lane"), ("worker",)))
TRIBUNALS = instrument(define(
    "qe_tribunals_total", "counter",
    "Tribunals submitted, by how they run: full, or bypassed (a single pass) under load or on request",
    ("run",)))

# --- the engine (worker; read from the engine loop when scraped) ----------------

ENGINE_IN_FLIGHT = define(
    "qe_engine_in_flight", "gauge", "Requests in the worker's engine", ("model", "lane"), ("worker",))
ENGINE_BULK_WAITING = define(
    "qe_engine_bulk_waiting", "gauge", "Batch rows the worker holds that wait for a seat in the engine",
    ("model",), ("worker",))
ENGINE_REQUESTS = define(
    "qe_engine_requests_total", "counter",
    "Requests that left the engine, by outcome: finished, aborted (cancelled or lost), rejected, error",
    ("model", "lane", "outcome"), ("worker",))
ENGINE_BUSY = define(
    "qe_engine_busy_seconds_total", "counter",
    "Seconds the engine spent in steps (the finished requests' engine_seconds split it)", ("model",), ("worker",))
ENGINE_STEP = define(
    "qe_engine_step_seconds", "histogram", "Wall time of one engine step", ("model",), ("worker",),
    STEP_SECONDS_BUCKETS)
ENGINE_BATCH = define(
    "qe_engine_batch_size", "histogram", "Requests in the engine at each step", ("model",), ("worker",),
    BATCH_SIZE_BUCKETS)
ENGINE_LOAD = define(
    "qe_engine_load_seconds", "gauge", "Seconds the worker took to load its engine (set once, at start)",
    ("model",), ("worker",))

# --- delivery and the dispatcher (serve) ----------------------------------------

WEBHOOK_ATTEMPTS = instrument(define(
    "qe_webhook_attempts_total", "counter",
    "Webhook delivery attempts, by what the event became: delivered, pending (a retry is due later) or failed",
    ("result",)))
DISPATCHED = instrument(define(
    "qe_dispatcher_messages_total", "counter", "Messages the dispatcher sent, by kind (job, chunk, webhook)",
    ("kind",)))
LOST = instrument(define(
    "qe_dispatcher_lost_messages_total", "counter", "Messages found missing from the broker and sent again, by kind",
    ("kind",)))
BROKER_LOSSES = instrument(define(
    "qe_dispatcher_broker_losses_total", "counter", "Times the broker was found to have lost its data"))
RECOVERED = instrument(define(
    "qe_dispatcher_recovered_total", "counter",
    "Jobs and batch rows whose worker died, by outcome (requeued, failed)", ("outcome",)))

# --- the autoscaler --------------------------------------------------------------

DECISIONS = instrument(define(
    "qe_autoscaler_decisions_total", "counter", "Scaling decisions, by action: up, down, hold, wait",
    ("model", "action"), ("autoscaler",)))
WORKERS = instrument(define(
    "qe_autoscaler_workers", "gauge", "SLURM worker jobs by state: pending, starting, serving, stopping",
    ("model", "state"), ("autoscaler",)))
DESIRED = instrument(define(
    "qe_autoscaler_desired_workers", "gauge", "Workers the last decision wanted", ("model",), ("autoscaler",)))
LEADING = instrument(define(
    "qe_autoscaler_leading", "gauge", "1 while this autoscaler leads its deployment, 0 while it stands by",
    (), ("autoscaler",)))


#: The lanes each kind of job runs in.
KIND_LANES = (("single", "interactive"), ("single", "bulk"), ("tribunal_step", "interactive"), ("batch_item", "bulk"))
JOB_OUTCOMES = ("succeeded", "failed", "cancelled")


def initialize(settings, role, models=None):
    """Create the series a ``role`` (web, worker, autoscaler) counts, at zero.

    A series that first appears at 1 hides its first increment from
    ``rate()`` and ``increase()``, and a scrape should show every metric a
    process has; so each process creates its series for the known label
    values at start (``models``: those it serves; default every profile).
    """
    models = sorted(settings.models if models is None else models)
    INITIALIZERS[role](settings.autoscaler.deployment, models)


def _initialize_web(deployment, models):
    for model in models:
        for kind, lane in KIND_LANES:
            JOBS_SUBMITTED.labels(deployment, model, lane, kind)
            for outcome in JOB_OUTCOMES:
                JOBS_ENDED.labels(deployment, model, lane, kind, outcome)
    for run in ("full", "bypassed_under_load", "bypassed_on_request"):
        TRIBUNALS.labels(deployment, run)
    for result in ("delivered", "pending", "failed"):
        WEBHOOK_ATTEMPTS.labels(deployment, result)
    for kind in ("job", "chunk", "webhook"):
        DISPATCHED.labels(deployment, kind)
    for kind in ("job", "chunk"):
        LOST.labels(deployment, kind)
    BROKER_LOSSES.labels(deployment)
    for outcome in ("requeued", "failed"):
        RECOVERED.labels(deployment, outcome)


def _initialize_worker(deployment, models):
    for model in models:
        for kind, lane in KIND_LANES:
            for outcome in ("succeeded", "failed"):  # a worker cancels nothing
                JOBS_ENDED.labels(deployment, model, lane, kind, outcome)
            for histogram in (QUEUE_WAIT, FIRST_TOKEN, TOTAL_TIME):
                histogram.labels(deployment, model, lane, kind)
        for lane in LANES:
            TOKENS.labels(deployment, model, lane)
        JOBS_SUBMITTED.labels(deployment, model, "interactive", "tribunal_step")  # a tribunal's next steps


def _initialize_autoscaler(deployment, models):
    for model in models:
        for action in ("up", "down", "hold", "wait"):
            DECISIONS.labels(deployment, model, action)
    LEADING.labels(deployment).set(0)


INITIALIZERS = {"web": _initialize_web, "worker": _initialize_worker, "autoscaler": _initialize_autoscaler}


def kind_of(item):
    """The kind label of a claimed item (``queue_engine.leases.Item``)."""
    if item.batch_id is not None:
        return "batch_item"
    return "tribunal_step" if item.parent_id is not None else "single"


# --- the queue collector ------------------------------------------------------------


class QueueCollector:
    """Reads each model's queue from the database when Prometheus scrapes.

    A few index lookups per scrape (``queue_engine.load``): the database is
    the queue of record, so this reads what a worker would find, even after
    the broker lost its messages.
    """

    def __init__(self, sessions, settings):
        self.sessions, self.settings = sessions, settings

    def collect(self):
        deployment, models = self.settings.autoscaler.deployment, sorted(self.settings.models)
        try:
            with self.sessions() as session:
                backlog = load.read_backlog(session, models)["queues"]
                oldest = load.read_oldest_waiting(session, models)
        except Exception:
            log.warning("could not read the queue for /metrics", exc_info=True)
            return
        now = utcnow()
        depth, running, age = family(QUEUE_DEPTH), family(QUEUE_RUNNING), family(QUEUE_OLDEST)
        for model in models:
            for lane in LANES:
                queue = backlog[queue_name(model, lane)]
                labels = [deployment, model, lane]
                depth.add_metric(labels, queue["waiting"])
                running.add_metric(labels, queue["reserved"])
                since = oldest.get((model, lane))
                age.add_metric(labels, max(0.0, (now - since).total_seconds()) if since and queue["waiting"] else 0.0)
        yield from (depth, running, age)


# --- exposition -----------------------------------------------------------------------


def is_multiprocess():
    """True in a process that shares its counters through files (``serve --workers N``)."""
    return MULTIPROC_ENV in os.environ


def exposition(*collectors):
    """The scrape answer of this process: its metrics, and ``collectors``' (read now).

    In multiprocess mode the counters are summed over every process's files
    instead of read from this process's memory.
    """
    extra = CollectorRegistry(auto_describe=False)
    for collector in collectors:
        extra.register(collector)
    if is_multiprocess():
        multiprocess.MultiProcessCollector(extra)
        return generate_latest(extra)
    return generate_latest(REGISTRY) + generate_latest(extra)
