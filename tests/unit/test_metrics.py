"""The metrics (``queue_engine.metrics``) and what fills them: the web's
counts of submissions and cancels and its queue readings from the database
(SQLite and PostgreSQL), the engine loop's plain-number stats read at scrape
time, the runner's outcomes counted after commit, the autoscaler's decisions.

Counters live in the process-wide registry, so each test uses a deployment
of its own: its samples start at zero."""

import io
import os
import secrets
import subprocess
import sys
from concurrent.futures import wait
from datetime import timedelta

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select, update

from queue_engine import jobs, leases
from queue_engine.broker import Sender, make_celery
from queue_engine.db import transaction
from queue_engine.metrics import CATALOGUE
from queue_engine.models import Batch, Job, utcnow
from queue_engine.schemas import JobCreate
from queue_engine.scaling import Decision
from queue_engine.settings import load_settings
from slurm.autoscaler import Autoscaler
from tests.conftest import make_key
from tests.helpers import ROOT, metric_value, wait_until
from tests.unit.test_batcher import ScriptedEngine, request
from tests.unit.test_runner import HeldEngine
from tests.unit.test_tribunals_api import TWO_MODELS
from workers.batcher import EngineLoop
from workers.metrics import EngineCollector
from workers.runtime import WorkerRuntime


def new_deployment():
    return f"t{secrets.token_hex(4)}"


def samples(text):
    """``{(sample name, sorted label items): value}`` of a scrape."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(found, name, **labels):
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


def scrape(client):
    response = client.get("/metrics")
    assert response.status_code == 200
    return samples(response.get_data(as_text=True))


def total(found, name, deployment):
    """The sum of ``name``'s samples of ``deployment``."""
    return sum(v for (sample, labels), v in found.items() if sample == name and ("deployment", deployment) in labels)


def registry_value(name, **labels):
    return REGISTRY.get_sample_value(name, labels) or 0.0


def upload(client, auth, text):
    form = {"model": "tiny", "file": (io.BytesIO(text.encode()), "rows.csv")}
    response = client.post("/api/v1/batches", data=form, headers=auth, content_type="multipart/form-data")
    assert response.status_code == 202, response.get_json()
    return response.get_json()


# --- the catalogue ------------------------------------------------------------------


def test_catalogue_names_and_labels_follow_one_scheme():
    """Every metric is qe_-named once, counters end in _total, all carry deployment, histograms have buckets."""
    names = [metric.name for metric in CATALOGUE]
    assert len(names) == len(set(names))
    for metric in CATALOGUE:
        assert metric.name.startswith("qe_") and metric.labels[0] == "deployment", metric
        assert metric.name.endswith("_total") == (metric.type == "counter"), metric
        assert (metric.buckets is not None) == (metric.type == "histogram"), metric
        assert set(metric.exposed_by) <= {"web", "worker", "autoscaler"} and metric.exposed_by, metric
        assert len(set(metric.labels)) == len(metric.labels) and "le" not in metric.labels, metric


def test_processes_that_share_a_multiproc_dir_add_up_in_one_scrape(tmp_path):
    """`serve --workers N`: counts of separate processes are summed by any one's scrape; and importing the
    CLI does not import prometheus_client, so `serve` can switch it to multiprocess mode first."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}

    def python(code):
        return subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout

    for count in (2, 3):
        python(f"from queue_engine.metrics import JOBS_SUBMITTED as c; c.labels('d', 'tiny', 'bulk', 'single').inc({count})")
    scrape = python("import sys; from queue_engine.metrics import exposition; sys.stdout.write(exposition().decode())")
    assert metric_value(scrape, "qe_jobs_submitted_total", deployment="d", kind="single") == 5
    assert python("import sys, queue_engine.cli; print('prometheus_client' in sys.modules)").strip() == "False"


# --- the web: queue readings, submissions, cancels ------------------------------------


def test_metrics_read_the_queue_depth_and_oldest_wait_from_the_database(make_app, auth_for):
    """Waiting and claimed requests per lane, and the oldest waiting request's age, as the database has them."""
    deployment = new_deployment()
    app = make_app(autoscaler={"deployment": deployment})
    client, auth, sessions = app.test_client(), auth_for(app), app.extensions["qe_sessions"]
    ids = [client.post("/api/v1/jobs", json={"model": "tiny", "prompt": f"q{n}"}, headers=auth).get_json()["id"]
           for n in range(3)]
    client.post("/api/v1/jobs", json={"model": "tiny", "prompt": "slow", "priority": "bulk"}, headers=auth)
    batch = upload(client, auth, "id,prompt\n1,a\n2,b\n3,c\n4,d\n")
    now = utcnow()
    with transaction(sessions) as session:
        assert len(leases.claim(session, "w1", 60, job_ids=[ids[0]])) == 1
        session.execute(update(Job).where(Job.id == ids[0]).values(created_at=now - timedelta(seconds=900)))
        session.execute(update(Job).where(Job.id == ids[1]).values(created_at=now - timedelta(seconds=120)))
        session.execute(update(Batch).where(Batch.id == batch["id"]).values(created_at=now - timedelta(seconds=600)))
    found = scrape(client)
    labels = {"deployment": deployment, "model": "tiny"}
    assert value(found, "qe_queue_depth", lane="interactive", **labels) == 2
    assert value(found, "qe_queue_running", lane="interactive", **labels) == 1
    assert value(found, "qe_queue_depth", lane="bulk", **labels) == 5  # the bulk job and the 4 rows
    assert value(found, "qe_queue_running", lane="bulk", **labels) == 0
    # The claimed job is no longer waiting: the oldest waiting one is 120 s old.
    assert 120 <= value(found, "qe_queue_oldest_waiting_seconds", lane="interactive", **labels) < 150
    assert 600 <= value(found, "qe_queue_oldest_waiting_seconds", lane="bulk", **labels) < 630


def test_an_empty_queue_reads_zero_for_every_lane(make_app):
    """Every configured model and lane has its series, at zero, before anything was submitted."""
    deployment = new_deployment()
    found = scrape(make_app(autoscaler={"deployment": deployment}).test_client())
    for name in ("qe_queue_depth", "qe_queue_running", "qe_queue_oldest_waiting_seconds"):
        for lane in ("interactive", "bulk"):
            assert (name, tuple(sorted({"deployment": deployment, "model": "tiny", "lane": lane}.items()))) in found
            assert value(found, name, deployment=deployment, model="tiny", lane=lane) == 0


def test_submissions_cancels_and_upload_failures_add_up(make_app, auth_for):
    """What was submitted is what ended plus what still waits: cancels and rows failed at upload count as ends."""
    deployment = new_deployment()
    app = make_app(autoscaler={"deployment": deployment})
    client, auth = app.test_client(), auth_for(app)
    ids = [client.post("/api/v1/jobs", json={"model": "tiny", "prompt": f"q{n}"}, headers=auth).get_json()["id"]
           for n in range(3)]
    assert client.post(f"/api/v1/jobs/{ids[0]}/cancel", headers=auth).status_code == 200
    assert client.post(f"/api/v1/jobs/{ids[0]}/cancel", headers=auth).status_code == 409  # counted once
    batch = upload(client, auth, "id,prompt\n1,a\n2,\n3,c\n")  # row 2 fails at upload (empty prompt)
    assert client.post(f"/api/v1/batches/{batch['id']}/cancel", headers=auth).status_code == 200
    found = scrape(client)
    labels = {"deployment": deployment, "model": "tiny"}
    single = {"lane": "interactive", "kind": "single", **labels}
    rows = {"lane": "bulk", "kind": "batch_item", **labels}
    assert value(found, "qe_jobs_submitted_total", **single) == 3
    assert value(found, "qe_jobs_ended_total", outcome="cancelled", **single) == 1
    assert value(found, "qe_jobs_submitted_total", **rows) == 3
    assert value(found, "qe_jobs_ended_total", outcome="failed", **rows) == 1
    assert value(found, "qe_jobs_ended_total", outcome="cancelled", **rows) == 2
    submitted = total(found, "qe_jobs_submitted_total", deployment)
    ended = total(found, "qe_jobs_ended_total", deployment)
    waiting = sum(value(found, "qe_queue_depth", lane=lane, **labels) for lane in ("interactive", "bulk"))
    assert (submitted, ended, waiting) == (6, 4, 2)


def test_a_cancelled_tribunal_counts_its_steps(make_app, auth_for):
    """A tribunal's first steps count as submitted, and as cancelled when it is cancelled; the run is counted."""
    deployment = new_deployment()
    app = make_app(models=TWO_MODELS, autoscaler={"deployment": deployment})
    client, auth = app.test_client(), auth_for(app)
    body = {"prompt": "What is a tuple?", "candidates": ["tiny", "tiny-b", "tiny"], "judge": "tiny-b",
            "bypass": "never", "params": {"max_tokens": 16}}
    tribunal = client.post("/api/v1/tribunals", json=body, headers=auth).get_json()
    assert client.post(f"/api/v1/jobs/{tribunal['id']}/cancel", headers=auth).status_code == 200
    found = scrape(client)
    for model, count in (("tiny", 2), ("tiny-b", 1)):
        labels = {"deployment": deployment, "model": model, "lane": "interactive", "kind": "tribunal_step"}
        assert value(found, "qe_jobs_submitted_total", **labels) == count
        assert value(found, "qe_jobs_ended_total", outcome="cancelled", **labels) == count
    assert value(found, "qe_tribunals_total", deployment=deployment, run="full") == 1


# --- the engine loop ---------------------------------------------------------------------


def collect(loop, deployment="d", model="tiny", load_seconds=2.5):
    """The families an :class:`EngineCollector` watching ``loop`` yields, as samples."""
    collector = EngineCollector()
    collector.watch(deployment, model, loop, load_seconds)
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for family in collector.collect() for s in family.samples}


def test_engine_stats_count_steps_sizes_and_requests_by_lane():
    """Each step's size and time land in the histograms; requests that left the engine are counted by lane."""
    engine = ScriptedEngine()
    loop = EngineLoop(engine, idle_wait=0.01, bulk_seats_with_interactive=None)
    futures = [loop.submit(request(f"i{n}", steps=2)) for n in range(3)]
    futures += [loop.submit(request(f"b{n}", steps=1, lane="bulk")) for n in range(2)]
    rejected = loop.submit(request("x", prompt="too long"))
    loop.start()
    try:
        wait(futures, timeout=5)
        assert rejected.exception(timeout=5) is not None
        found = collect(loop)
    finally:
        loop.stop()
    labels = {"deployment": "d", "model": "tiny"}
    steps = len(engine.batches)
    assert engine.batches[0] == ["b0", "b1", "i0", "i1", "i2"]
    assert value(found, "qe_engine_step_seconds_count", **labels) == steps
    assert value(found, "qe_engine_batch_size_count", **labels) == steps
    assert value(found, "qe_engine_batch_size_bucket", le="4.0", **labels) == steps - 1  # only the first held 5
    assert value(found, "qe_engine_batch_size_sum", **labels) == sum(map(len, engine.batches))
    assert value(found, "qe_engine_requests_total", lane="interactive", outcome="finished", **labels) == 3
    assert value(found, "qe_engine_requests_total", lane="bulk", outcome="finished", **labels) == 2
    assert value(found, "qe_engine_requests_total", lane="interactive", outcome="rejected", **labels) == 1
    assert value(found, "qe_engine_busy_seconds_total", **labels) == pytest.approx(
        value(found, "qe_engine_step_seconds_sum", **labels))
    assert value(found, "qe_engine_load_seconds", **labels) == 2.5
    assert value(found, "qe_engine_in_flight", lane="interactive", **labels) == 0


def test_engine_in_flight_by_lane_and_aborts_are_read_at_scrape_time():
    """In-flight requests per lane are read from the loop when scraped; an abort counts in its lane."""
    engine = ScriptedEngine()
    engine.gated = True
    loop = EngineLoop(engine, idle_wait=0.01)
    for request_id, lane in (("i0", "interactive"), ("i1", "interactive"), ("b0", "bulk")):
        loop.submit(request(request_id, steps=5, lane=lane))
    loop.start()  # all three in its first look
    labels = {"deployment": "d", "model": "tiny"}
    try:
        wait_until(lambda: loop.in_flight == 3, 5, "three requests in the engine")
        found = collect(loop)
        assert value(found, "qe_engine_in_flight", lane="interactive", **labels) == 2
        assert value(found, "qe_engine_in_flight", lane="bulk", **labels) == 1
        loop.abort("b0")
        engine.step_gate.release()
        wait_until(lambda: loop.in_flight == 2, 5, "the bulk row aborted")
        found = collect(loop)
    finally:
        engine.gated = False
        engine.step_gate.release()
        loop.stop()
    assert value(found, "qe_engine_requests_total", lane="bulk", outcome="aborted", **labels) == 1
    assert value(found, "qe_engine_in_flight", lane="bulk", **labels) == 0
    assert value(found, "qe_engine_in_flight", lane="interactive", **labels) == 2


def test_a_loop_without_metrics_keeps_no_stats():
    """metrics=False: the loop counts nothing (the benchmark's baseline); in-flight is still readable."""
    engine = ScriptedEngine()
    loop = EngineLoop(engine, idle_wait=0.01, metrics=False)
    future = loop.submit(request("r", steps=2))
    loop.start()
    try:
        assert future.result(timeout=5) == "done r"
        found = collect(loop)
    finally:
        loop.stop()
    assert loop.stats is None
    assert not any(name.startswith(("qe_engine_step_seconds", "qe_engine_requests_total")) for name, _ in found)
    assert value(found, "qe_engine_in_flight", deployment="d", model="tiny", lane="interactive") == 0


# --- the runner: outcomes after commit -------------------------------------------------------


@pytest.fixture
def runtime(tmp_path, database_url, sessions):
    settings = load_settings(environ={}, data_dir=tmp_path, database_url=database_url,
                             autoscaler={"deployment": new_deployment()})
    engine = HeldEngine()
    loop = EngineLoop(engine, idle_wait=0.01).start()
    runtime = WorkerRuntime(settings, "tiny", sessions, loop, "w1", Sender(make_celery(settings), sessions, settings))
    runtime.engine = engine
    yield runtime
    engine.release.set()
    runtime.runner.stop()
    loop.stop()


def test_outcomes_tokens_and_latencies_count_only_what_was_stored(runtime):
    """Ends, tokens and latencies count once the finish committed; a job cancelled while it ran counts no answer."""
    owner = make_key(runtime.sessions, "alice")[1]
    with transaction(runtime.sessions) as session:
        ids = [jobs.create_job(session, owner, JobCreate(model="tiny", prompt=f"q{n}"), runtime.settings)[0].id
               for n in range(5)]
    futures = [runtime.runner.run(job_ids=[job_id]) for job_id in ids]
    wait_until(lambda: len(runtime.engine.pending) == 5, 10, "five jobs in the engine")
    with transaction(runtime.sessions) as session:
        jobs.cancel_job(session, owner, ids[0])
    runtime.engine.release.set()
    wait(futures, timeout=10)
    with runtime.sessions() as session:
        statuses = sorted(session.scalars(select(Job.status).where(Job.id.in_(ids))))
    assert statuses == ["cancelled"] + ["succeeded"] * 4
    labels = {"deployment": runtime.settings.autoscaler.deployment, "model": "tiny", "lane": "interactive"}
    assert registry_value("qe_jobs_ended_total", kind="single", outcome="succeeded", **labels) == 4
    assert registry_value("qe_jobs_ended_total", kind="single", outcome="failed", **labels) == 0
    assert registry_value("qe_tokens_generated_total", **labels) == 4  # HeldEngine: 1 completion token each
    assert registry_value("qe_job_queue_wait_seconds_count", kind="single", **labels) == 5  # all five started
    assert registry_value("qe_job_total_seconds_count", kind="single", **labels) == 4
    # HeldEngine's generations carry no first-token time: nothing observed rather than a guess.
    assert registry_value("qe_job_first_token_seconds_count", kind="single", **labels) == 0


# --- the autoscaler ----------------------------------------------------------------------------


def test_autoscaler_counts_decisions_and_shows_workers_only_while_leading(settings, sessions):
    """A committed round counts its decision and sets workers by state; standing by clears them."""
    deployment = new_deployment()
    scaler = Autoscaler(settings.model_copy(update={"autoscaler": settings.autoscaler.model_copy(
        update={"deployment": deployment})}), sessions, slurm=None)
    scaler.show_leading(True)
    scaler.count_decision("tiny", Decision("up", 3, "backlog", 2), {"pending": 2, "serving": 1})
    scaler.count_decision("tiny", Decision("hold", 3, "steady"), {"pending": 1, "starting": 1, "serving": 1})
    labels = {"deployment": deployment, "model": "tiny"}
    assert registry_value("qe_autoscaler_decisions_total", action="up", **labels) == 1
    assert registry_value("qe_autoscaler_decisions_total", action="hold", **labels) == 1
    assert registry_value("qe_autoscaler_desired_workers", **labels) == 3
    assert [registry_value("qe_autoscaler_workers", state=state, **labels)
            for state in ("pending", "starting", "serving", "stopping")] == [1, 1, 1, 0]
    assert registry_value("qe_autoscaler_leading", deployment=deployment) == 1
    scaler.show_leading(False)
    assert registry_value("qe_autoscaler_leading", deployment=deployment) == 0
    assert REGISTRY.get_sample_value("qe_autoscaler_workers", {**labels, "state": "pending"}) is None
