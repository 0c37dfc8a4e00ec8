"""One request from HTTP through Redis to a batching vLLM worker and back,
with every part real: redis-server, `queue-engine worker` running vLLM on the
tiny model, the web app over HTTP, PostgreSQL."""

from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.helpers import wait_until

pytestmark = pytest.mark.integration


def batch_steps(worker):
    """The worker's engine steps so far: all of them, those of one request, those of 8 or fewer."""
    return (worker.metric("qe_engine_batch_size_count"), worker.metric("qe_engine_batch_size_bucket", le="1.0"),
            worker.metric("qe_engine_batch_size_bucket", le="8.0"))

def submit_all(client, bodies):
    with ThreadPoolExecutor(16) as pool:
        return list(pool.map(client.submit_job, bodies))


def wait_all(client, jobs, timeout=180):
    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(lambda job: client.wait_for_job(job["id"], timeout=timeout), jobs))


def test_64_concurrent_jobs_succeed_in_shared_batches(cluster):
    """64 jobs at once all succeed with text and token counts, and the engine ran them in batches."""
    worker = cluster.workers[0]
    client = cluster.new_client()
    before = batch_steps(worker)
    jobs = submit_all(client, [
        {"model": "tiny", "prompt": f"The number {i} is", "params": {"max_tokens": 32, "temperature": 0.7, "seed": i}}
        for i in range(64)
    ])
    finished = wait_all(client, jobs)
    assert [job["status"] for job in finished] == ["succeeded"] * 64
    for job in finished:
        assert job["result"]["text"] and job["result"]["finish_reason"] in ("length", "stop")
        assert job["usage"]["prompt_tokens"] > 0 and 0 < job["usage"]["completion_tokens"] <= 32
        assert job["attempts"] == 1
    steps, solo_steps, eight_or_fewer = (after - at_first for after, at_first in zip(batch_steps(worker), before))
    big_steps = steps - eight_or_fewer
    assert steps < 64 * 32, "never one request per step"
    assert big_steps > 0, "some steps ran more than 8 requests together"
    assert solo_steps < steps


def test_job_submitted_mid_generation_joins_the_running_batch(cluster):
    """A short job submitted while long ones generate finishes before they do."""
    client = cluster.new_client()
    long_jobs = submit_all(client, [
        {"model": "tiny", "prompt": f"Long story {i}", "params": {"max_tokens": 400, "temperature": 0}}
        for i in range(8)
    ])
    wait_until(lambda: all(client.get_job(j["id"])["status"] == "running" for j in long_jobs), 60,
               "the long jobs to be running")
    short = client.wait_for_job(client.submit_job(
        {"model": "tiny", "prompt": "Short", "params": {"max_tokens": 4, "temperature": 0}})["id"], timeout=60)
    long_finished = wait_all(client, long_jobs)
    assert short["status"] == "succeeded"
    assert all(job["status"] == "succeeded" for job in long_finished)
    assert short["finished_at"] < max(job["finished_at"] for job in long_finished)
    assert short["started_at"] > min(job["started_at"] for job in long_finished)


def test_prompt_longer_than_the_model_fails_at_once(cluster):
    """A prompt the engine refuses fails on the first attempt with the engine's reason."""
    client = cluster.new_client()
    job = client.submit_job({"model": "tiny", "prompt": "word " * 3000, "params": {"max_tokens": 8}})
    job = client.wait_for_job(job["id"], timeout=60)
    assert job["status"] == "failed" and job["attempts"] == 1
    assert job["error"]["code"] == "engine_rejected"
    assert "maximum context length" in job["error"]["message"]


def test_chat_messages_run_through_the_chat_template(cluster):
    """A messages request succeeds and counts the templated prompt's tokens."""
    client = cluster.new_client()
    plain = client.submit_job({"model": "tiny", "prompt": "hi", "params": {"max_tokens": 4}})
    chat = client.submit_job({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "params": {"max_tokens": 4}})
    plain, chat = wait_all(client, [plain, chat])
    assert chat["status"] == "succeeded"
    assert chat["usage"]["prompt_tokens"] > plain["usage"]["prompt_tokens"], "role markers were added"


def test_cancelled_running_job_is_aborted_in_the_engine(cluster):
    """Cancelling a running job frees its engine slot and no result is stored."""
    worker = cluster.workers[0]
    client = cluster.new_client()
    aborted = worker.metric("qe_engine_requests_total", outcome="aborted")
    job = client.submit_job({"model": "tiny", "prompt": "Go on", "params": {"max_tokens": 500, "temperature": 0}})
    wait_until(lambda: client.get_job(job["id"])["status"] == "running", 60, "the job to start")
    cancelled = client._call("POST", f"/api/v1/jobs/{job['id']}/cancel")
    assert cancelled["status"] == "cancelled"
    wait_until(lambda: worker.metric("qe_engine_requests_total", outcome="aborted") > aborted, 30,
               "the worker to abort the request")
    final = client.get_job(job["id"])
    assert final["status"] == "cancelled" and final["result"] is None
