"""Tribunals through real Redis and two real workers on two profiles of the
tiny model (``tiny`` and ``tiny-b``, another seed and a shorter context)."""

import io

import pytest
import redis
from sqlalchemy import select

from queue_engine.models import Job
from tests.helpers import wait_until
from tests.integration.conftest import Cluster

pytestmark = pytest.mark.integration

BYPASS_BACKLOG = 200
TINY_B = """
[models.tiny-b]
path = "{tiny}"
engine_args = { max_model_len = 384, seed = 1 }
max_in_flight = 128

[tribunal]
bypass_backlog = %d
""" % BYPASS_BACKLOG


@pytest.fixture(scope="module")
def two_models(tmp_path_factory, tiny_model_dir, redis_server, cluster_database_url):
    """Web + a warm worker for ``tiny`` and another for ``tiny-b``."""
    cluster = Cluster(tmp_path_factory.mktemp("tribunal"), tiny_model_dir, redis_server.url, cluster_database_url,
                      config_toml=TINY_B, lease_seconds=3)
    cluster.start_worker(model="tiny")
    cluster.start_worker(model="tiny-b")
    yield cluster
    cluster.stop()


def steps_of(cluster, job_id):
    with cluster.sessions() as session:
        return list(session.scalars(select(Job).where(Job.parent_id == job_id).order_by(Job.created_at, Job.id)))


def finished_by_model(cluster):
    """How many requests each worker's engine has finished."""
    return {worker.model: worker.metric("qe_engine_requests_total", outcome="finished") for worker in cluster.workers}


def in_flight(cluster):
    return sum(worker.metric("qe_engine_in_flight") for worker in cluster.workers)


def test_the_full_trace_of_a_tribunal_that_never_bypasses(two_models):
    """Candidates run in parallel on both workers' engines, then the judge, then the reviser; every
    step's text is in the trace, the judge and reviser were asked about every candidate, usage adds up."""
    client = two_models.new_client()
    before = finished_by_model(two_models)
    question = "What does the list.append method do?"
    job = client.submit_tribunal({
        "prompt": question, "candidates": ["tiny", "tiny-b", "tiny"], "judge": "tiny-b", "bypass": "never",
        "params": {"max_tokens": 32, "temperature": 0.8},
    })
    done = client.wait_for_job(job["id"], timeout=120)
    assert done["status"] == "succeeded", done["error"]
    trace = done["tribunal"]
    assert [c["model"] for c in trace["candidates"]] == ["tiny", "tiny-b", "tiny"]
    assert len({c["seed"] for c in trace["candidates"]}) == 3
    assert all(c["text"] for c in trace["candidates"]) and trace["critique"]
    assert trace["final"] == done["result"]["text"] and trace["bypassed"] is False
    # The same model asked twice with different seeds gave two different answers.
    assert trace["candidates"][0]["text"] != trace["candidates"][2]["text"]

    steps = steps_of(two_models, job["id"])
    assert [(s.step, s.model, s.status) for s in steps] == [
        ("candidate", "tiny", "succeeded"), ("candidate", "tiny-b", "succeeded"), ("candidate", "tiny", "succeeded"),
        ("critique", "tiny-b", "succeeded"), ("revision", "tiny-b", "succeeded")]
    candidates, critique, revision = steps[:3], steps[3], steps[4]
    assert max(s.started_at for s in candidates) < min(s.finished_at for s in candidates), "candidates overlap"
    assert critique.started_at >= max(s.finished_at for s in candidates)
    assert revision.started_at >= critique.finished_at
    for c in trace["candidates"]:
        assert c["text"] in critique.prompt and c["text"] in revision.prompt
    assert question in critique.prompt and question in revision.prompt
    assert trace["critique"] in revision.prompt
    assert done["usage"] == {"prompt_tokens": sum(s.prompt_tokens for s in steps),
                             "completion_tokens": sum(s.completion_tokens for s in steps)}
    after = finished_by_model(two_models)
    assert {model: after[model] - before[model] for model in after} == {"tiny": 2, "tiny-b": 3}


def test_always_runs_one_pass_on_the_first_candidates_model(two_models):
    client = two_models.new_client()
    before = finished_by_model(two_models)
    job = client.submit_tribunal({"prompt": "Name a tuple method.", "candidates": ["tiny-b", "tiny"],
                                  "judge": "tiny", "bypass": "always", "params": {"max_tokens": 8}})
    done = client.wait_for_job(job["id"], timeout=60)
    assert done["status"] == "succeeded"
    trace = done["tribunal"]
    assert trace["bypassed"] and "always" in trace["reason"]
    assert [c["model"] for c in trace["candidates"]] == ["tiny-b"]
    assert trace["final"] == trace["candidates"][0]["text"] == done["result"]["text"]
    assert [s.step for s in steps_of(two_models, job["id"])] == ["single_pass"]
    after = finished_by_model(two_models)
    assert {model: after[model] - before[model] for model in after} == {"tiny": 0, "tiny-b": 1}


def test_auto_bypasses_behind_a_large_batch_and_not_on_quiet_queues(two_models):
    client = two_models.new_client()
    body = {"prompt": "What is a dict?", "candidates": ["tiny", "tiny-b"], "judge": "tiny-b",
            "params": {"max_tokens": 8}}
    rows = "id,prompt\n" + "".join(f"{i},Tell me about number {i}\n" for i in range(1500))
    batch = client.submit_batch(io.BytesIO(rows.encode()), "tiny-b", filename="load.csv",
                                params={"max_tokens": 16})

    busy = client.wait_for_job(client.submit_tribunal(body)["id"], timeout=120)
    assert busy["status"] == "succeeded"
    trace = busy["tribunal"]
    assert trace["bypassed"] is True, trace
    assert trace["readings"]["backlog"] > BYPASS_BACKLOG == trace["readings"]["threshold"]
    assert trace["readings"]["queues"]["qe.tiny-b.bulk"]["requests"] > BYPASS_BACKLOG
    assert "tribunal.bypass_backlog" in trace["reason"]
    assert [s.step for s in steps_of(two_models, busy["id"])] == ["single_pass"]

    client.cancel_batch(batch["id"])
    client.wait_for_batch(batch["id"], timeout=120)
    broker = redis.Redis.from_url(two_models.settings.broker_url)
    wait_until(lambda: broker.llen("qe.tiny-b.bulk") == 0 and in_flight(two_models) == 0, 60,
               "the worker to drop the cancelled batch's chunks and finish its last rows")
    broker.close()
    quiet = client.wait_for_job(client.submit_tribunal(body)["id"], timeout=120)
    assert quiet["status"] == "succeeded"
    assert quiet["tribunal"]["bypassed"] is False and quiet["tribunal"]["reason"] is None
    assert quiet["tribunal"]["readings"]["backlog"] <= BYPASS_BACKLOG
    assert [s.step for s in steps_of(two_models, quiet["id"])] == ["candidate", "candidate", "critique", "revision"]


def test_a_failing_step_fails_the_tribunal_and_names_it(two_models):
    """The question fits tiny's context (512) but, inside the judge's prompt, not tiny-b's (384)."""
    client = two_models.new_client()
    question = " ".join(["The list type is a mutable sequence."] * 40)  # about 320 tokens
    job = client.submit_tribunal({"prompt": question, "candidates": ["tiny", "tiny"], "judge": "tiny-b",
                                  "bypass": "never", "params": {"max_tokens": 8}})
    done = client.wait_for_job(job["id"], timeout=60)
    assert done["status"] == "failed"
    assert done["error"]["code"] == "engine_rejected"
    assert done["error"]["message"].startswith("the critique (judge, model tiny-b) failed: ")
    assert all(c["text"] for c in done["tribunal"]["candidates"]) and done["tribunal"]["final"] is None
    assert [(s.step, s.status) for s in steps_of(two_models, job["id"])] == [
        ("candidate", "succeeded"), ("candidate", "succeeded"), ("critique", "failed")]


def test_cancel_mid_tribunal_stops_its_steps_and_schedules_no_more(two_models):
    client = two_models.new_client()
    job = client.submit_tribunal({"prompt": "Write about lists.", "candidates": ["tiny", "tiny-b"],
                                  "judge": "tiny", "bypass": "never",
                                  "params": {"max_tokens": 360}})
    wait_until(lambda: client.get_job(job["id"])["status"] == "running", 30, "a candidate to start")
    cancelled = client.cancel_job(job["id"])
    assert cancelled["status"] == "cancelled"
    wait_until(lambda: in_flight(two_models) == 0, 30, "the workers to drop the cancelled steps")
    steps = steps_of(two_models, job["id"])
    assert [s.step for s in steps] == ["candidate", "candidate"]
    assert all(s.status == "cancelled" for s in steps)
    assert client.get_job(job["id"])["status"] == "cancelled"
