"""The pages over Flask's test client: who sees what, and that the pages hold
the data (progress, tribunal traces, webhook attempts, the models' load);
the readers behind them (``queue_engine.overview``). Sign-in, CSRF and
headers are in ``test_dashboard.py``."""

import doctest
import re
from datetime import timedelta
from types import SimpleNamespace

from sqlalchemy import select, update

from queue_engine import overview, webhooks
from queue_engine.db import transaction
from queue_engine.models import Batch, Job, ScalingState, WebhookDelivery, WorkerAllocation, utcnow
from tests.conftest import make_key
from tests.unit.test_dashboard import (
    bearer,
    csrf_of,
    page,
    signed_in,
    submit_batch,
    submit_job,
    submit_tribunal,
)
from web import dashboard_format

SLURM_MODEL = {"big": {"path": "tiny", "slurm": {"partition": "gpu"}}}


# --- who sees what -----------------------------------------------------------------


def test_another_keys_work_is_nowhere_and_its_pages_are_404(app):
    """Bob sees none of Alice's ids, and her pages, results and cancels are 404 pages, never 403."""
    alice, alice_key, _ = signed_in(app, "alice")
    ids = [submit_job(alice, alice_key), submit_batch(alice, alice_key), submit_tribunal(alice, alice_key)]
    bob, bob_key, _ = signed_in(app, "bob")
    own_job = submit_job(bob, bob_key)
    html = page(bob, "/dashboard")
    assert own_job in html and not any(work_id in html for work_id in ids) and "alice" not in html
    token = csrf_of(bob.get("/dashboard"))
    job_id, batch_id, tribunal_id = ids
    for response in (bob.get(f"/dashboard/jobs/{job_id}"), bob.get(f"/dashboard/jobs/{tribunal_id}"),
                     bob.get(f"/dashboard/batches/{batch_id}"), bob.get(f"/dashboard/batches/{batch_id}/results"),
                     bob.post(f"/dashboard/batches/{batch_id}/cancel", data={"csrf_token": token}),
                     bob.post(f"/dashboard/jobs/{job_id}/cancel", data={"csrf_token": token})):
        assert response.status_code == 404 and response.mimetype == "text/html"
        assert "Not found" in response.get_data(as_text=True)
    assert alice.get(f"/api/v1/batches/{batch_id}", headers=bearer(alice_key)).get_json()["status"] == "in_progress"
    assert alice.get(f"/api/v1/jobs/{job_id}", headers=bearer(alice_key)).get_json()["status"] == "queued"


def test_an_operator_sees_and_cancels_every_keys_work(app):
    """An operator key lists every key's batches and jobs with the key's name, opens and cancels them."""
    alice, alice_key, _ = signed_in(app, "alice")
    job_id, batch_id = submit_job(alice, alice_key), submit_batch(alice, alice_key)
    operator, _, _ = signed_in(app, "ops", operator=True)
    html = page(operator, "/dashboard")
    assert job_id in html and batch_id in html and '<td data-label="Key">alice</td>' in html and "operator</span>" in html
    assert "Say hello" in page(operator, f"/dashboard/jobs/{job_id}")
    token = csrf_of(operator.get(f"/dashboard/batches/{batch_id}"))
    assert operator.post(f"/dashboard/batches/{batch_id}/cancel", data={"csrf_token": token}).status_code == 302
    assert alice.get(f"/api/v1/batches/{batch_id}", headers=bearer(alice_key)).get_json()["status"] == "cancelled"


def test_slurm_details_are_for_operators_and_load_for_everyone(make_app):
    """Every key sees a model's backlog, workers by state and scaling reason; only operators
    see SLURM job ids, nodes and the last failure's words."""
    app = make_app(models=SLURM_MODEL)
    deployment = app.extensions["qe_settings"].autoscaler.deployment
    with transaction(app.extensions["qe_sessions"]) as session:
        session.add_all([
            WorkerAllocation(deployment=deployment, model="big", slurm_job_id="4242", state="serving",
                             slurm_state="RUNNING", node="gpu-node-07", submitted_at=utcnow()),
            WorkerAllocation(deployment=deployment, model="big", slurm_job_id="4243", state="pending",
                             slurm_state="PENDING", submitted_at=utcnow()),
            ScalingState(deployment=deployment, model="big", state="backoff", failures=2, backlog=300, desired=2,
                         action="wait", reason="backlog 300 at 256 per worker wants 2", decided_at=utcnow(),
                         retry_at=utcnow() + timedelta(seconds=30), last_failure="job 4240 ended FAILED on gpu-node-03"),
        ])
    ordinary, _, _ = signed_in(app, "alice")
    operator, _, _ = signed_in(app, "ops", operator=True)
    for client in (ordinary, operator):
        html = page(client, "/dashboard")
        card = html[html.index('id="model-big"'):]
        assert 'data-state="serving">serving <strong>1</strong>' in card
        assert 'data-state="pending">pending <strong>1</strong>' in card
        assert "backlog 300 at 256 per worker wants 2" in card and "backoff" in card and "2 failed starts" in card
    ordinary_html, operator_html = page(ordinary, "/dashboard"), page(operator, "/dashboard")
    for secret in ("4242", "4243", "gpu-node-07", "gpu-node-03"):
        assert secret in operator_html and secret not in ordinary_html


# --- the pages hold the data -------------------------------------------------------


def test_the_batch_page_carries_its_progress_in_the_html(app):
    """Counts as text and as attributes of the bar; rate, time left, results links, the cancel form."""
    client, key, _ = signed_in(app)
    batch_id = submit_batch(client, key, rows=10)
    with transaction(app.extensions["qe_sessions"]) as session:
        session.execute(update(Batch).where(Batch.id == batch_id).values(
            completed=4, failed=1, created_at=utcnow() - timedelta(seconds=10)))
    html = page(client, f"/dashboard/batches/{batch_id}")
    assert ('data-total="10" data-completed="4" data-failed="1" data-cancelled="0"' in html
            and 'aria-valuenow="5"' in html and 'aria-valuemax="10"' in html)
    assert '<span class="n-completed">4</span> completed' in html and "(50%)" in html
    assert 'class="completed" x="0.0" y="0" width="40.0"' in html and 'class="failed" x="40.0" y="0" width="10.0"' in html
    assert re.search(r'class="rate">0\.5 rows/s<', html) and 'class="eta">10 s<' in html
    for file_format in ("csv", "jsonl", "xlsx"):
        assert f"/dashboard/batches/{batch_id}/results?format={file_format}" in html
    assert "Cancel batch" in html and 'data-refresh="2"' in html
    overview_html = page(client, "/dashboard")
    assert 'data-total="10" data-completed="4"' in overview_html and "questions.csv" in overview_html


def test_results_download_through_the_session(app):
    """The results link streams what the API streams, by the cookie alone; a bad format is a 400 page."""
    client, key, _ = signed_in(app)
    batch_id = submit_batch(client, key)
    response = client.get(f"/dashboard/batches/{batch_id}/results?format=csv")
    api = client.get(f"/api/v1/batches/{batch_id}/results?format=csv", headers=bearer(key))
    assert response.status_code == 200 and response.mimetype == "text/csv"
    assert response.get_data() == api.get_data() and response.get_data(as_text=True).startswith("id,status")
    assert f'filename="{batch_id}-results.csv"' in response.headers["Content-Disposition"]
    assert client.get(f"/dashboard/batches/{batch_id}/results?format=pdf").status_code == 400
    assert app.test_client().get(f"/dashboard/batches/{batch_id}/results").status_code == 302


def test_the_job_page_shows_the_text_the_tribunal_trace_and_webhook_attempts(app):
    """Prompt, candidates, critique, final and bypass words; each delivery attempt; all escaped."""
    client, key, owner_id = signed_in(app)
    tribunal_id = submit_tribunal(client, key)
    sessions = app.extensions["qe_sessions"]
    with transaction(sessions) as session:
        job = session.get(Job, tribunal_id)
        trace = dict(job.tribunal)
        trace["candidates"] = [{**c, "text": f"<b>candidate {i}</b>"} for i, c in enumerate(trace["candidates"])]
        trace.update(critique="The first is better.", final="A list holds items in order.")
        job.tribunal, job.status, job.result_text, job.finish_reason = trace, "succeeded", trace["final"], "stop"
        job.started_at = job.finished_at = utcnow()
        event = webhooks.record_event(session, owner_id, "https://hooks.example.org/x", "job.completed", {},
                                      job_id=tribunal_id)
        session.flush()
        session.add(WebhookDelivery(event_id=event.id, attempt=1, status_code=503, error="HTTP 503 from receiver",
                                    duration_ms=12, at=utcnow()))
    html = page(client, f"/dashboard/jobs/{tribunal_id}")
    assert "What is a list?" in html and 'class="kind">tribunal<' in html
    assert "&lt;b&gt;candidate 0&lt;/b&gt;" in html and "<b>candidate" not in html
    assert "The first is better." in html and "A list holds items in order." in html and "ran in full" in html
    assert "HTTP 503 from receiver" in html and "<td>503</td>" in html and "job.completed" in html
    assert "data-refresh" not in html  # it ended: nothing to refresh


def test_a_bypassed_tribunal_says_why(app):
    """A tribunal run as a single pass shows that it was bypassed and the recorded reason."""
    client, key, _ = signed_in(app)
    body = {"prompt": "Name a tuple method.", "candidates": ["tiny", "tiny"], "judge": "tiny", "bypass": "always"}
    tribunal_id = client.post("/api/v1/tribunals", json=body, headers=bearer(key)).get_json()["id"]
    html = page(client, f"/dashboard/jobs/{tribunal_id}")
    assert "<strong>bypassed</strong>" in html and "always" in html


def test_a_prompt_cannot_inject_markup(app):
    """A prompt holding HTML and script is shown as text."""
    client, key, _ = signed_in(app)
    job_id = submit_job(client, key, prompt='<script>alert("x")</script><img src=x onerror=alert(1)>')
    for html in (page(client, f"/dashboard/jobs/{job_id}"), page(client, "/dashboard")):
        assert "<script>alert" not in html and "<img src=x" not in html
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in page(client, f"/dashboard/jobs/{job_id}")


def test_the_job_list_shows_status_kind_model_and_latency(app):
    """Recent jobs list single jobs and tribunals (not batch rows), newest first, with their latency."""
    client, key, _ = signed_in(app)
    first, tribunal_id = submit_job(client, key), submit_tribunal(client, key)
    batch_id = submit_batch(client, key)
    with transaction(app.extensions["qe_sessions"]) as session:
        session.execute(update(Job).where(Job.id == first).values(
            status="succeeded", created_at=utcnow() - timedelta(seconds=42), finished_at=utcnow(), completion_tokens=7))
        row_ids = session.scalars(select(Job.id).where(Job.batch_id == batch_id)).all()
    html = page(client, "/dashboard")
    jobs_html = html[html.index('id="jobs"'):]
    assert jobs_html.index(tribunal_id) < jobs_html.index(first)
    row = jobs_html[jobs_html.index(f'data-job="{first}"'):]
    row = row[:row.index("</tr>")]
    assert ('data-label="Kind">single<' in row and 'data-label="Model">tiny<' in row and "succeeded" in row
            and 'data-label="Latency">42 s<' in row and 'data-label="Tokens">7<' in row)
    assert not any(row_id in html for row_id in row_ids)


# --- what the pages are read from ---------------------------------------------------


def test_token_rates_sum_the_tokens_of_jobs_finished_per_step(sessions):
    """Completion tokens per second, per 30 s step back from now, per model; tribunals and older jobs left out."""
    key, owner_id = make_key(sessions, "alice")
    now = utcnow()

    def finished(seconds_ago, tokens, kind="single", model="tiny"):
        return Job(id=f"job_{seconds_ago}_{kind}_{model}", owner_id=owner_id, kind=kind, model=model, status="succeeded",
                   created_at=now - timedelta(seconds=seconds_ago + 1), finished_at=now - timedelta(seconds=seconds_ago),
                   completion_tokens=tokens, params={}, attempts=1)

    with transaction(sessions) as session:
        session.add_all([finished(5, 300), finished(20, 150), finished(45, 60), finished(890, 30),
                         finished(5, 9999, kind="tribunal"), finished(1000, 9999), finished(5, 90, model="other")])
    with sessions() as session:
        rates = overview.token_rates(session, ["tiny", "other", "idle"], now=now)
    tiny = rates["tiny"]
    assert len(tiny.points) == 30 and tiny.step == 30
    assert tiny.now == 15.0 and tiny.points[-2] == 2.0 and tiny.points[0] == 1.0 and sum(tiny.points) == 18.0
    assert rates["other"].now == 3.0 and rates["idle"].peak == 0


def test_progress_rate_and_time_left():
    """The rate counts rows that ran since upload; time left only while in progress."""
    start = utcnow() - timedelta(seconds=100)
    running = SimpleNamespace(total=1000, completed=180, failed=20, cancelled=0, status="in_progress",
                              created_at=start, completed_at=None, cancelled_at=None)
    progress = overview.Progress.of(running, now=start + timedelta(seconds=100))
    assert (progress.rate, progress.eta_seconds, progress.remaining, progress.percent) == (2.0, 400.0, 800, 20.0)
    waiting = SimpleNamespace(**{**vars(running), "completed": 0, "failed": 0})
    assert overview.Progress.of(waiting).eta_seconds is None
    done = SimpleNamespace(**{**vars(running), "completed": 980, "status": "completed",
                              "completed_at": start + timedelta(seconds=50)})
    assert (overview.Progress.of(done).rate, overview.Progress.of(done).eta_seconds) == (20.0, None)


def test_the_formatting_examples_hold():
    """The doctests of the dashboard's filters (times, durations, rates, bars, sparklines)."""
    assert doctest.testmod(dashboard_format).failed == 0
