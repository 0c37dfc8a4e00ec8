"""Bulk batches, side by side in one run:

(a) ingest: a 100,000-row CSV uploaded to `queue-engine serve` (cluster mode,
    no worker), from the start of the upload to every row stored and carried
    by a chunk message; the server's peak RSS; versus a naive loop that stores
    each row as a job and sends it with its own ``apply_async`` (same
    database, same Redis);
(b) end to end: 2,048 rows x 32 tokens through a batch on a `queue-engine
    worker` versus vLLM's offline ``LLM.generate`` on the same rows and profile;
(c) interactive latency (created -> started, created -> finished) of single
    jobs on an idle worker and behind a bulk backlog, p50 and p95.

Prints the figures as one JSON object on its last line.

    python bench/batches.py [--database-url postgresql+psycopg://...] [--rows 100000]
"""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import redis as redis_py  # noqa: E402
import requests  # noqa: E402
from sqlalchemy import func, select  # noqa: E402

from bench.results import save  # noqa: E402
from bench.throughput import CACHE, PYTHON, cluster_env, make_prompts, offline_generate  # noqa: E402
from queue_engine.apikeys import create_api_key  # noqa: E402
from queue_engine.client import Client  # noqa: E402
from queue_engine.db import make_sessions, transaction  # noqa: E402
from queue_engine.jobs import create_job  # noqa: E402
from queue_engine.models import ApiKey, Job  # noqa: E402
from queue_engine.schemas import JobCreate  # noqa: E402
from queue_engine.settings import load_settings  # noqa: E402
from tests.helpers import RedisServer, WebInProcess, free_port, stop_process, wait_until  # noqa: E402
from queue_engine.broker import send_jobs  # noqa: E402
from workers.celery_app import make_celery  # noqa: E402
from workers.engine import resolve_model_dir  # noqa: E402


def new_key(sessions):
    with transaction(sessions) as session:
        return create_api_key(session, f"bench-{time.time_ns()}").key


def peak_rss_mb(pid):
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) / 1024 for line in status if line.startswith("VmHWM:"))


def write_csv(path, prompts):
    with open(path, "w") as f:
        f.write("id,prompt\n")
        f.writelines(f"r{i},{prompt}\n" for i, prompt in enumerate(prompts))


# --- (a) ingest ------------------------------------------------------------------------


def ingest(env, settings, rows, naive_rows, tmp):
    """Upload ``rows`` rows to a `queue-engine serve` subprocess; then the naive loop."""
    path = tmp / "ingest.csv"
    write_csv(path, (f"Summarise support ticket number {i} in one sentence." for i in range(rows)))
    port = free_port()
    server = subprocess.Popen([PYTHON, "-m", "queue_engine.cli", "--log-level", "WARNING", "serve", "--port", str(port)],
                              env={**os.environ, **env}, cwd=ROOT, stdout=open(tmp / "serve.log", "w"),
                              stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _answers(url), 60, "queue-engine serve")
        sessions = make_sessions(settings.sqlalchemy_url)
        client = Client(url, new_key(sessions), timeout=600)
        rss_before = peak_rss_mb(server.pid)
        started = time.perf_counter()
        batch = client.submit_batch(path, "tiny", params={"max_tokens": 16})
        upload_s = time.perf_counter() - started
        rss_peak = peak_rss_mb(server.pid)
    finally:
        stop_process(server)
    assert batch["request_counts"]["total"] == rows
    naive_s = naive_ingest(settings, sessions, naive_rows)
    return {
        "ingest_rows": rows,
        "ingest_file_mb": round(path.stat().st_size / 2**20, 1),
        "ingest_s": round(upload_s, 2),
        "ingest_rows_per_s": round(rows / upload_s),
        "ingest_server_rss_before_mb": round(rss_before),
        "ingest_server_peak_rss_mb": round(rss_peak),
        "naive_rows": naive_rows,
        "naive_rows_per_s": round(naive_rows / naive_s),
        "ratio_ingest_vs_naive": round((rows / upload_s) / (naive_rows / naive_s), 1),
    }


def _answers(url):
    try:
        return requests.get(url + "/healthz", timeout=1).ok
    except requests.ConnectionError:
        return False


def naive_ingest(settings, sessions, rows):
    """One transaction and one ``apply_async`` per row, as a first attempt would."""
    app = make_celery(settings)
    with sessions() as session:
        owner_id = session.query(ApiKey.id).first()[0]
    started = time.perf_counter()
    for i in range(rows):
        request = JobCreate(model="tiny", prompt=f"Summarise support ticket number {i} in one sentence.",
                            priority="bulk", params={"max_tokens": 16})
        with transaction(sessions) as session:
            job, _ = create_job(session, owner_id, request, settings)
        send_jobs(app, [(job.id, job.model)])
    return time.perf_counter() - started


# --- (b) and (c): a worker running batches -----------------------------------------------


class Service:
    """The web app and its dispatcher in this process, one `queue-engine worker` subprocess."""

    def __init__(self, env, settings, model, log_path):
        self.web = WebInProcess(settings)
        self.app = self.web.app
        self.client = Client(self.web.url, new_key(self.web.sessions), timeout=600)
        self.model = model
        self.worker = subprocess.Popen(
            [PYTHON, "-m", "queue_engine.cli", "--log-level", "WARNING", "worker", "--model", model],
            env={**os.environ, **env}, cwd=ROOT, stdout=open(log_path, "w"), stderr=subprocess.STDOUT)
        self.run_job("warm up", 4)

    def run_job(self, prompt, max_tokens):
        job = self.client.submit_job({"model": self.model, "prompt": prompt,
                                      "params": {"max_tokens": max_tokens, "temperature": 0}})
        return self.client.wait_for_job(job["id"], timeout=600, interval=0.02)

    def stop(self):
        stop_process(self.worker)
        self.web.close()


def batch_vs_offline(service, model_dir, prompts, max_tokens, max_in_flight, tmp):
    prompts_file = tmp / "prompts.json"
    prompts_file.write_text(json.dumps(prompts))
    path = tmp / "batch.csv"
    write_csv(path, prompts)
    print(f"(b) {len(prompts)} rows x {max_tokens} tokens as a batch ...", flush=True)
    batch = service.client.submit_batch(path, service.model, params={"max_tokens": max_tokens, "temperature": 0})
    done = service.client.wait_for_batch(batch["id"], timeout=3600, interval=0.5)
    assert done["request_counts"]["completed"] == len(prompts), done
    elapsed = (datetime.fromisoformat(done["completed_at"]) - datetime.fromisoformat(batch["created_at"])).total_seconds()
    tokens = completion_tokens(service, batch["id"])
    print("(b) the same rows through offline LLM.generate ...", flush=True)
    offline = offline_generate(model_dir, prompts_file, max_tokens, max_in_flight)
    batch_rate, offline_rate = tokens / elapsed, offline["completion_tokens"] / offline["elapsed_s"]
    return {
        "e2e_rows": len(prompts),
        "e2e_max_tokens": max_tokens,
        "batch_s": round(elapsed, 2),
        "batch_tokens_per_s": round(batch_rate, 1),
        "offline_s": round(offline["elapsed_s"], 2),
        "offline_tokens_per_s": round(offline_rate, 1),
        "ratio_batch_vs_offline": round(batch_rate / offline_rate, 3),
    }


def completion_tokens(service, batch_id):
    with service.app.extensions["qe_sessions"]() as session:
        return session.scalar(select(func.sum(Job.completion_tokens)).where(Job.batch_id == batch_id))


def interactive_latency(service, jobs, backlog_rows, tmp):
    print(f"(c) {jobs} interactive jobs on an idle worker ...", flush=True)
    idle = [latencies(service.run_job(f"Quick question {i}?", 16)) for i in range(jobs)]
    path = tmp / "backlog.csv"
    write_csv(path, make_prompts(backlog_rows))
    batch = service.client.submit_batch(path, service.model, params={"max_tokens": 32, "temperature": 0})
    wait_until(lambda: service.client.get_batch(batch["id"])["request_counts"]["completed"] > 0, 600,
               "the backlog to be running")
    print(f"(c) {jobs} interactive jobs behind a {backlog_rows}-row backlog ...", flush=True)
    busy = [latencies(service.run_job(f"Quick question {i}?", 16)) for i in range(jobs)]
    left = service.client.cancel_batch(batch["id"])["request_counts"]
    figures = {"latency_jobs": jobs, "backlog_rows": backlog_rows,
               "backlog_rows_left_after": left["cancelled"]}
    for name, runs in (("idle", idle), ("behind_backlog", busy)):
        for part, index in (("start", 0), ("total", 1)):
            values = [run[index] for run in runs]
            figures[f"{name}_{part}_p50_ms"] = round(1000 * statistics.median(values), 1)
            figures[f"{name}_{part}_p95_ms"] = round(1000 * percentile(values, 95), 1)
    return figures


def latencies(job):
    created, started, finished = (datetime.fromisoformat(job[name]) for name in ("created_at", "started_at", "finished_at"))
    return (started - created).total_seconds(), (finished - created).total_seconds()


def percentile(values, p):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(p / 100 * len(ordered)) - 1)]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000, help="(a) rows uploaded")
    parser.add_argument("--naive-rows", type=int, default=3_000, help="(a) rows through the naive loop")
    parser.add_argument("--e2e-rows", type=int, default=2048)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--latency-jobs", type=int, default=20)
    parser.add_argument("--backlog-rows", type=int, default=20_000)
    parser.add_argument("--model", default="tiny-large", choices=["tiny", "tiny-large"])
    parser.add_argument("--max-in-flight", type=int, default=256)
    parser.add_argument("--database-url", default=None, help="default: a SQLite file in a temporary directory")
    args = parser.parse_args()

    model_dir = resolve_model_dir(args.model, CACHE, log=print)
    tiny_dir = resolve_model_dir("tiny", CACHE, log=print)
    figures = {"benchmark": "batches", "model": args.model}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        redis = RedisServer(tmp)
        env = cluster_env(tmp, redis.url, args.model, model_dir, args.max_in_flight, args.database_url,
                          extra_toml=f'[models.tiny]\npath = "{tiny_dir}"\n' if args.model != "tiny" else "")
        settings = load_settings(environ=env)
        figures["database"] = settings.sqlalchemy_url.split(":")[0]
        try:
            print(f"(a) ingest of {args.rows} rows, then {args.naive_rows} through the naive loop ...", flush=True)
            figures.update(ingest(env, settings, args.rows, args.naive_rows, tmp))
            redis_flush(redis)
            service = Service(env, settings, args.model, tmp / "worker.log")
            try:
                figures.update(batch_vs_offline(service, model_dir, make_prompts(args.e2e_rows), args.max_tokens,
                                                args.max_in_flight, tmp))
                figures.update(interactive_latency(service, args.latency_jobs, args.backlog_rows, tmp))
            finally:
                service.stop()
        finally:
            redis.stop()
    save("batches", figures)


def redis_flush(redis):
    """Drop the ingest's messages (no worker serves their model here)."""
    client = redis_py.Redis.from_url(redis.url)
    client.flushdb()
    client.close()


if __name__ == "__main__":
    main()
