"""Throughput of the spine, side by side in one run:

(a) N prompts as single jobs through HTTP + Redis + a `queue-engine worker`,
(b) the same prompts through vLLM's offline ``LLM.generate`` (one call),
(c) the same prompts through a naive worker that runs one prompt per engine call.

Same model profile (the larger tiny variant by default), greedy decoding, so
all three generate the same tokens. Prints the figures as one JSON object on
its last line.

    python bench/throughput.py [--prompts 512] [--max-tokens 32] [--model tiny-large]
"""

import argparse
import json
import signal
import psutil
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.results import save  # noqa: E402
from queue_engine.apikeys import create_api_key  # noqa: E402
from queue_engine.client import Client  # noqa: E402
from sqlalchemy import func, select  # noqa: E402

from queue_engine.db import make_sessions, transaction, upgrade_database  # noqa: E402
from queue_engine.models import Job  # noqa: E402
from queue_engine.settings import load_settings  # noqa: E402
from tests.helpers import RedisServer, free_port, stop_process, wait_until, wait_until_serving  # noqa: E402
from workers.engine import resolve_model_dir  # noqa: E402

CACHE = Path(os.environ.get("QUEUE_ENGINE_BENCH_CACHE", Path.home() / ".cache" / "queue-engine-bench"))
PYTHON = sys.executable


def make_prompts(n):
    subjects = ["the list type", "a function", "the import system", "exceptions", "a dictionary",
                "the with statement", "class instances", "the for loop"]
    return [f"Question {i}: explain {subjects[i % len(subjects)]}." for i in range(n)]


def offline_generate(model_dir, prompts_file, max_tokens, max_num_seqs, repeats=1):
    out = subprocess.run(
        [PYTHON, str(ROOT / "bench" / "offline_generate.py"), "--model-dir", str(model_dir), "--prompts",
         str(prompts_file), "--max-tokens", str(max_tokens), "--max-num-seqs", str(max_num_seqs),
         "--repeats", str(repeats)],
        capture_output=True, text=True, check=True, cwd=ROOT,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


#: Where a profile's samples go, the first rule whose text is in the stack wins.
PROFILE_BUCKETS = {
    "worker": [("engine step (vLLM)", "_step (workers/batcher.py"),
               ("engine: adding requests", "_add (workers/batcher.py"),
               ("runner: database", ("workers/runner.py", "sqlalchemy")),
               ("runner: other", "workers/runner.py"),
               ("Celery + kombu (taking messages, acks)", ("celery/", "kombu/")),
               ("other", "")],
    "web": [("dispatcher", "workers/dispatcher.py"),
            ("HTTP: database", ("web/", "sqlalchemy")),
            ("HTTP: sending to the broker", ("web/", "kombu/")),
            ("HTTP: the rest (server, Flask, JSON, pydantic)", ("waitress", "flask", "werkzeug")),
            ("other", "")],
}


def start_profile(pid, path):
    """py-spy sampling ``pid`` (on-CPU stacks) into ``path``, if py-spy is installed."""
    binary = Path(sys.executable).with_name("py-spy")
    if not binary.exists():
        return None
    return subprocess.Popen([str(binary), "record", "--pid", str(pid), "--format", "raw", "--rate", "50",
                             "--nonblocking", "-o", str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def summarise_profile(path, buckets):
    """Share of the samples in ``path`` (py-spy raw: ``stack count`` lines) per bucket, in percent."""
    counts = dict.fromkeys([name for name, _ in buckets], 0)
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        for name, needles in buckets:
            needles = (needles,) if isinstance(needles, str) else needles
            if all(needle in stack for needle in needles):
                counts[name] += int(count)
                break
    total = sum(counts.values()) or 1
    return {name: round(100 * count / total, 1) for name, count in counts.items()}


def run_through_service(env, settings, command, prompts, max_tokens, tmp, name, model, redis, profile=None):
    """Start `queue-engine serve` (cluster mode, its own process) and a worker
    with ``command``, warm up, then time all prompts as HTTP jobs.

    Also measures the CPU seconds the web, the worker and Redis used while the
    jobs ran: less the engine's own (the offline run's), that is what the
    service costs beyond the engine."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    serve = subprocess.Popen([PYTHON, "-m", "queue_engine.cli", "--log-level", "WARNING", "serve", "--port", str(port)],
                             env={**os.environ, **env}, cwd=ROOT, stdout=open(tmp / f"{name}-serve.log", "w"),
                             stderr=subprocess.STDOUT)
    worker = subprocess.Popen(command, env={**os.environ, **env}, cwd=ROOT,
                              stdout=open(tmp / f"{name}-worker.log", "w"), stderr=subprocess.STDOUT)
    sessions = make_sessions(settings.sqlalchemy_url)
    try:
        wait_until_serving(url, serve, tmp / f"{name}-serve.log", 120)
        with transaction(sessions) as session:
            client = Client(url, create_api_key(session, f"bench-{time.time_ns()}").key)
        warm = client.submit_job({"model": model, "prompt": "warm up", "params": {"max_tokens": 4}})
        client.wait_for_job(warm["id"], timeout=600)
        processes = {"web": psutil.Process(serve.pid), "worker": psutil.Process(worker.pid),
                     "redis": psutil.Process(redis.process.pid)}
        cpu_before = {name: cpu_seconds(process) for name, process in processes.items()}
        client_cpu_before = cpu_seconds(psutil.Process())
        profilers = {} if profile is None else {
            role: start_profile(processes[role].pid, profile / f"{name}-{role}.txt") for role in ("web", "worker")}
        body = lambda p: {"model": model, "prompt": p, "params": {"max_tokens": max_tokens, "temperature": 0}}  # noqa: E731
        started = datetime.now(timezone.utc)
        with ThreadPoolExecutor(16) as pool:
            ids = [job["id"] for job in pool.map(lambda p: client.submit_job(body(p)), prompts)]
        submitted = datetime.now(timezone.utc)
        # Wait on the database, not by polling every job over HTTP: on two
        # cores, thousands of polls would steal the CPU the engine needs.
        wait_until(lambda: count_finished(sessions, ids) == len(ids), 1800, "every job to finish", 0.2)
        cpu = {name: cpu_seconds(process) - cpu_before[name] for name, process in processes.items()}
        client_cpu = cpu_seconds(psutil.Process()) - client_cpu_before
        for profiler in profilers.values():
            if profiler is not None:
                stop_process(profiler, signal.SIGINT)
        finished = [client.get_job(job_id) for job_id in ids]
    finally:
        stop_process(worker)
        stop_process(serve)
    assert all(job["status"] == "succeeded" for job in finished), [j["error"] for j in finished if j["error"]][:3]
    last = max(datetime.fromisoformat(job["finished_at"]) for job in finished)
    at = lambda job, name: datetime.fromisoformat(job[name])  # noqa: E731
    waited = sorted((at(j, "started_at") - at(j, "created_at")).total_seconds() for j in finished)
    ran = sorted((at(j, "finished_at") - at(j, "started_at")).total_seconds() for j in finished)
    print(f"   queue wait p50 {waited[len(waited) // 2]:.2f} s, max {waited[-1]:.2f} s; "
          f"run p50 {ran[len(ran) // 2]:.2f} s, max {ran[-1]:.2f} s; "
          f"last start {max(at(j, 'started_at') for j in finished) - started}", flush=True)
    return {"elapsed_s": (last - started).total_seconds(), "submit_s": (submitted - started).total_seconds(),
            "completion_tokens": sum(j["usage"]["completion_tokens"] for j in finished), "cpu_s": cpu,
            "client_cpu_s": client_cpu,
            "profile": {role: summarise_profile(profile / f"{name}-{role}.txt", PROFILE_BUCKETS[role])
                        for role, profiler in profilers.items() if profiler is not None}}


def cpu_seconds(process):
    """User and system CPU seconds of ``process``, all its threads."""
    times = process.cpu_times()
    return times.user + times.system


def count_finished(sessions, ids):
    with sessions() as session:
        return session.scalar(select(func.count()).select_from(Job).where(
            Job.id.in_(ids), Job.status.in_(["succeeded", "failed", "cancelled"])))


def cluster_env(tmp, redis_url, model, model_dir, max_in_flight, database_url=None, extra_toml=""):
    """A benchmark's cluster-mode environment: a config file with ``model``'s
    profile, a migrated database (a SQLite file in ``tmp`` by default), and the
    ``QUEUE_ENGINE_*`` variables that point at them and at Redis."""
    config = tmp / "queue-engine.toml"
    config.write_text(f'[models.{model}]\npath = "{model_dir}"\n'
                      f"engine_args = {{ max_model_len = 512, seed = 0 }}\nmax_in_flight = {max_in_flight}\n"
                      + extra_toml)
    database_url = database_url or f"sqlite:///{tmp / 'bench.db'}"
    upgrade_database(database_url)
    return {"QUEUE_ENGINE_CONFIG": str(config), "QUEUE_ENGINE_BROKER_URL": redis_url,
            "QUEUE_ENGINE_DATABASE_URL": database_url, "QUEUE_ENGINE_DATA_DIR": str(tmp / "data")}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=512)
    parser.add_argument("--naive-prompts", type=int, default=128,
                        help="prompts for (c); it is slow, and its rate does not depend on the count")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument("--model", default="tiny-large", choices=["tiny", "tiny-large"])
    parser.add_argument("--max-in-flight", type=int, default=256)
    parser.add_argument("--database-url", default=None, help="default: a SQLite file in a temporary directory")
    parser.add_argument("--profile", type=Path, default=None,
                        help="a directory: sample the web and the worker with py-spy while (a) runs, and print "
                             "where their CPU went")
    args = parser.parse_args()

    model_dir = resolve_model_dir(args.model, CACHE, log=print)
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    prompts = make_prompts(args.prompts)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        prompts_file = tmp / "prompts.json"
        prompts_file.write_text(json.dumps(prompts))
        redis = RedisServer(tmp)
        env = cluster_env(tmp, redis.url, args.model, model_dir, args.max_in_flight, args.database_url)
        settings = load_settings(environ=env)
        try:
            print(f"(b) offline LLM.generate, {args.prompts} prompts x {args.max_tokens} tokens ...", flush=True)
            offline = offline_generate(model_dir, prompts_file, args.max_tokens, args.max_in_flight)
            print("(a) HTTP + Redis + batching worker ...", flush=True)
            service = run_through_service(
                env, settings, [PYTHON, "-m", "queue_engine.cli", "--log-level", "WARNING", "worker", "--model", args.model],
                prompts, args.max_tokens, tmp, "service", args.model, redis, args.profile)
            print(f"(c) HTTP + Redis + naive one-prompt-per-call worker, {args.naive_prompts} prompts ...", flush=True)
            naive = {"elapsed_s": float("nan"), "completion_tokens": float("nan")} if args.skip_naive else run_through_service(
                env, settings, [PYTHON, str(ROOT / "bench" / "naive_worker.py"), args.model],
                prompts[:args.naive_prompts], args.max_tokens, tmp, "naive", args.model, redis)
        finally:
            redis.stop()

    rate = lambda r: r["completion_tokens"] / r["elapsed_s"]  # noqa: E731
    figures = {
        "benchmark": "throughput",
        "model": args.model,
        "prompts": args.prompts,
        "naive_prompts": args.naive_prompts,
        "max_tokens": args.max_tokens,
        "service_tokens_per_s": round(rate(service), 1),
        "offline_tokens_per_s": round(rate(offline), 1),
        "naive_tokens_per_s": round(rate(naive), 1),
        "service_s": round(service["elapsed_s"], 2),
        "service_submit_s": round(service["submit_s"], 2),
        "offline_s": round(offline["elapsed_s"], 2),
        "naive_s": round(naive["elapsed_s"], 2),
        "ratio_service_vs_offline": round(rate(service) / rate(offline), 3),
        "ratio_service_vs_naive": round(rate(service) / rate(naive), 2),
        # CPU of web + worker + Redis while the jobs ran, less the offline run's (the engine's own).
        "service_cpu_s": {name: round(value, 2) for name, value in service["cpu_s"].items()},
        "offline_cpu_s": round(offline["cpu_s"], 2),
        "client_cpu_s": round(service["client_cpu_s"], 2),  # the benchmark's own HTTP clients
        "profile_percent": service["profile"],
        "orchestration_cpu_ms_per_job": round(
            1000 * (sum(service["cpu_s"].values()) - offline["cpu_s"]) / args.prompts, 2),
    }
    save("throughput", figures)


if __name__ == "__main__":
    main()
