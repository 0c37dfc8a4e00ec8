"""Embedded mode: `queue-engine serve` with no configuration answers jobs with
no Redis, using its in-process broker and worker."""

import io
import json
import os
import subprocess

import pytest
import requests
from sqlalchemy import select

from queue_engine.client import Client
from queue_engine.db import make_sessions
from queue_engine.models import Job
from tests.helpers import free_port, queue_engine_command, spawn, stop_process, wait_until, wait_until_serving
from tests.receiver import Receiver

pytestmark = pytest.mark.integration


def start_embedded(directory, tiny_model_dir, config_toml=""):
    """`queue-engine serve` in embedded mode with the tiny model (and
    ``config_toml`` added to its configuration): ``(process, server)``."""
    config = directory / "queue-engine.toml"
    config.write_text(f'[models.tiny]\npath = "{tiny_model_dir}"\n' + config_toml)
    env = {"QUEUE_ENGINE_CONFIG": str(config), "QUEUE_ENGINE_DATA_DIR": str(directory / "data"),
           "QUEUE_ENGINE_WEBHOOK_ALLOW": "127.0.0.0/8"}
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("QUEUE_ENGINE_")}, **env}
    port = free_port()
    log_path = directory / "serve.log"
    process = spawn(["serve", "--port", str(port)], env, log_path)
    url = f"http://127.0.0.1:{port}"
    wait_until_serving(url, process, log_path, 240)
    key = (directory / "data" / "embedded-api-key").read_text().strip()
    secret = (directory / "data" / "embedded-webhook-secret").read_text().strip()
    return process, {"url": url, "key": key, "secret": secret, "env": env, "log": log_path}


@pytest.fixture(scope="module")
def embedded(tmp_path_factory, tiny_model_dir):
    process, server = start_embedded(tmp_path_factory.mktemp("embedded"), tiny_model_dir)
    yield server
    stop_process(process)


def test_embedded_serve_prints_a_key_and_answers_a_job(embedded):
    """First start prints the key it created; a job succeeds with no Redis anywhere."""
    assert "created an API key (kept in" in embedded["log"].read_text()
    assert embedded["key"] in embedded["log"].read_text()
    client = Client(embedded["url"], embedded["key"])
    job = client.wait_for_job(client.submit_job({"model": "tiny", "prompt": "The list", "params": {"max_tokens": 8}})["id"], 120)
    assert job["status"] == "succeeded" and job["usage"]["completion_tokens"] > 0
    ready = requests.get(embedded["url"] + "/readyz", timeout=5).json()
    assert ready == {"status": "ok", "checks": {"database": "ok", "broker": "ok"}}


def test_the_in_process_worker_delivers_webhooks(embedded):
    """Embedded mode needs no Redis for webhooks either: the event arrives, signed with the printed secret."""
    assert embedded["secret"] in embedded["log"].read_text()
    receiver = Receiver(secrets=[embedded["secret"]])
    client = Client(embedded["url"], embedded["key"])
    try:
        job = client.submit_job({"model": "tiny", "prompt": "Hi", "params": {"max_tokens": 2},
                                 "webhook_url": receiver.url})
        wait_until(receiver.accepted, 120, "the webhook", 0.1)
    finally:
        receiver.stop()
    [arrived] = receiver.deliveries
    assert arrived.verified_by == [0] and arrived.body["type"] == "job.completed"
    assert arrived.body["data"]["id"] == job["id"]


def test_cli_submit_wait_and_status(embedded):
    """`queue-engine submit --wait` prints the text; `status` prints the job as JSON."""
    env = {**embedded["env"], "QUEUE_ENGINE_URL": embedded["url"], "QUEUE_ENGINE_API_KEY": embedded["key"]}
    cli = queue_engine_command()
    submitted = subprocess.run([cli, "submit", "--prompt", "Hello", "--max-tokens", "4"],
                               env=env, capture_output=True, text=True, timeout=60)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    assert job_id.startswith("job_")
    waited = subprocess.run([cli, "submit", "--prompt", "Hello", "--max-tokens", "4", "--wait"],
                            env=env, capture_output=True, text=True, timeout=120)
    assert waited.returncode == 0 and waited.stdout.strip(), waited.stderr
    status = subprocess.run([cli, "status", job_id], env=env, capture_output=True, text=True, timeout=60)
    assert status.returncode == 0 and json.loads(status.stdout)["id"] == job_id


def test_a_batch_runs_in_embedded_mode(embedded):
    """The in-process worker consumes the bulk lane too."""
    client = Client(embedded["url"], embedded["key"])
    rows = "".join(f"{i},Say {i}\n" for i in range(100))
    batch = client.submit_batch(io.BytesIO(f"id,prompt\n{rows}".encode()), "tiny", filename="rows.csv",
                                params={"max_tokens": 3})
    done = client.wait_for_batch(batch["id"], timeout=120, interval=0.2)
    assert done["status"] == "completed"
    assert done["request_counts"] == {"total": 100, "completed": 100, "failed": 0, "cancelled": 0}


def run_demo(directory, tiny_model_dir, *args):
    """`queue-engine demo --prompts 3` with ``args`` on the tiny model, its data in ``directory``."""
    config = directory / "queue-engine.toml"
    config.write_text(f'[models.tiny]\npath = "{tiny_model_dir}"\n')
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("QUEUE_ENGINE_")},
           "QUEUE_ENGINE_CONFIG": str(config), "QUEUE_ENGINE_DATA_DIR": str(directory / "data")}
    demo = subprocess.run([queue_engine_command(), "demo", "--prompts", "3", *args], env=env,
                          capture_output=True, text=True, timeout=300)
    assert demo.returncode == 0, demo.stderr[-2000:]
    assert demo.stdout.count("[succeeded]") == 3
    assert "3 jobs, " in demo.stdout
    return demo


def test_demo_command_runs_sample_prompts_quietly(tmp_path, tiny_model_dir):
    """`queue-engine demo` (the README's first command) prints its own lines only: the
    log file, the engine loading, the server, every answer, the summary."""
    demo = run_demo(tmp_path, tiny_model_dir)
    shown = demo.stdout + demo.stderr
    assert "Task queue_engine.run_job" not in shown and "vllm" not in shown
    assert len(shown.splitlines()) == 4 + 3, shown
    log = (tmp_path / "data" / "logs" / "queue-engine.log").read_text()
    assert log.count("Task queue_engine.run_job") == 6  # received and succeeded, per job
    assert "INFO vllm.v1.engine.core" in log  # vLLM's own log lines
    assert "Loading safetensors checkpoint shards" in log  # a progress bar on stderr


def test_demo_verbose_shows_the_log_lines(tmp_path, tiny_model_dir):
    """`queue-engine demo -v` shows the log lines on the terminal too, and still writes the log file."""
    demo = run_demo(tmp_path, tiny_model_dir, "-v")
    assert demo.stderr.count("Task queue_engine.run_job") == 6
    assert "INFO vllm.v1.engine.core" in demo.stderr
    assert "succeeded in" in (tmp_path / "data" / "logs" / "queue-engine.log").read_text()


def test_a_tribunal_runs_in_embedded_mode(embedded):
    """auto reads the in-process broker's queues; the in-process worker runs every step."""
    client = Client(embedded["url"], embedded["key"])
    job = client.submit_tribunal({"prompt": "What is a set?", "candidates": ["tiny", "tiny"], "judge": "tiny",
                                  "params": {"max_tokens": 6}})
    done = client.wait_for_job(job["id"], timeout=120)
    assert done["status"] == "succeeded"
    trace = done["tribunal"]
    assert trace["bypassed"] is False and trace["readings"]["backlog"] == 0
    assert trace["critique"] and trace["final"] == done["result"]["text"]


def test_cli_submits_a_tribunal(embedded):
    env = {**embedded["env"], "QUEUE_ENGINE_URL": embedded["url"], "QUEUE_ENGINE_API_KEY": embedded["key"]}
    cli = queue_engine_command()
    waited = subprocess.run([cli, "submit", "--prompt", "What is a set?", "--judge", "tiny", "--candidates",
                             "tiny,tiny", "--bypass", "never", "--max-tokens", "4", "--wait"],
                            env=env, capture_output=True, text=True, timeout=120)
    assert waited.returncode == 0 and waited.stdout.strip(), waited.stderr
    submitted = subprocess.run([cli, "submit", "--prompt", "What is a set?", "--judge", "tiny", "--max-tokens", "4"],
                               env=env, capture_output=True, text=True, timeout=60)
    job = Client(embedded["url"], embedded["key"]).wait_for_job(submitted.stdout.strip(), 120)
    assert job["kind"] == "tribunal" and [c["model"] for c in job["tribunal"]["candidates"]] == ["tiny", "tiny"]


def test_work_waiting_when_embedded_serve_is_killed_runs_when_it_starts_again(tmp_path, tiny_model_dir):
    """SIGKILL an embedded `serve` with jobs running and queued: its in-process
    broker dies with it, and once it starts again on the same SQLite file, the
    dispatcher sends what was queued and requeues what was running."""
    config = tmp_path / "queue-engine.toml"
    config.write_text(f'[models.tiny]\npath = "{tiny_model_dir}"\nmax_in_flight = 4\n')
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("QUEUE_ENGINE_")},
           "QUEUE_ENGINE_CONFIG": str(config), "QUEUE_ENGINE_DATA_DIR": str(tmp_path / "data"),
           "QUEUE_ENGINE_LEASE_SECONDS": "2"}

    def start():
        port = free_port()
        process = spawn(["serve", "--port", str(port)], env, tmp_path / f"serve-{port}.log")
        wait_until_serving(f"http://127.0.0.1:{port}", process, tmp_path / f"serve-{port}.log", 240)
        key = (tmp_path / "data" / "embedded-api-key").read_text().strip()
        return process, Client(f"http://127.0.0.1:{port}", key)

    process, client = start()
    ids = [client.submit_job({"model": "tiny", "prompt": f"Story {n}", "params": {"max_tokens": 400}})["id"]
           for n in range(12)]
    wait_until(lambda: client.get_job(ids[0])["status"] == "running", 60, "the first job to run")
    process.kill()
    process.wait(10)
    sessions = make_sessions(f"sqlite:///{tmp_path / 'data' / 'queue-engine.db'}")
    with sessions() as session:
        at_kill = dict(session.execute(select(Job.id, Job.status).where(Job.id.in_(ids))).all())
    process, client = start()
    try:
        finished = {job_id: client.wait_for_job(job_id, timeout=180) for job_id in ids}
    finally:
        stop_process(process)
    assert {job["status"] for job in finished.values()} == {"succeeded"}
    assert "running" in at_kill.values() and "queued" in at_kill.values()
    for job_id, status in at_kill.items():
        expected = {"running": 2, "queued": 1}.get(status, finished[job_id]["attempts"])
        assert finished[job_id]["attempts"] == expected, (status, finished[job_id])
