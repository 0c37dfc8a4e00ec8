"""Latency against concurrency, as in the seed paper's latency figure
(arXiv 2508.17814: single requests at concurrency 1..256).

One service (Redis, `queue-engine serve` in cluster mode and one
`queue-engine worker`: bench/fairness.py's ``Service``). For each level c of
``--levels``, c closed-loop clients: each submits one single job through
HTTP, long-polls it (``GET /api/v1/jobs/<id>?wait=``) until it ends, then
submits the next; ``--jobs-per-client`` jobs each, or for ``--duration``
seconds.

Per level: latency p50/p95/p99 as the client saw it (``request_to_result_s``:
the POST sent -> the finished job in hand; it includes the long-poll's
``wait_interval``, 0.15 s by default) and as the service did (``latency_s``:
the job's created -> finished), the queue wait (created -> started), and
jobs/s and tokens/s over the level's span. Greedy decoding.

Prints the figures as one JSON object on its last line.

    python bench/concurrency.py [--levels 1,2,4,8,16,32,64,128,256] [--duration 20 | --jobs-per-client N]
                                [--max-tokens 32] [--model tiny-large]
"""

import argparse
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.batches import percentile  # noqa: E402
from bench.fairness import Service  # noqa: E402
from bench.results import save  # noqa: E402
from bench.throughput import CACHE  # noqa: E402
from queue_engine.apikeys import create_api_key  # noqa: E402
from queue_engine.client import FINISHED, Client  # noqa: E402
from queue_engine.db import transaction  # noqa: E402
from workers.engine import resolve_model_dir  # noqa: E402

LEVELS = "1,2,4,8,16,32,64,128,256"
#: The longest long-poll a client asks for (the server's default ``max_wait``).
WAIT_S = 30


def parse_levels(text):
    """``"1,4,16"`` -> ``[1, 4, 16]``.

    >>> parse_levels("1, 4,16")
    [1, 4, 16]
    """
    return [int(part) for part in text.split(",") if part.strip()]


def spread(values):
    """p50, p95 and p99 of ``values`` (seconds), to the millisecond."""
    return {"p50": round(statistics.median(values), 3), "p95": round(percentile(values, 95), 3),
            "p99": round(percentile(values, 99), 3)}


def run_one(client, body):
    """Submit one job and long-poll it until it ends.

    Returns:
        ``(job, seconds from the POST to the finished job in hand)``.
    """
    started = time.perf_counter()
    job = client.submit_job(body)
    while job["status"] not in FINISHED:
        response = client.session.get(f"{client.url}/api/v1/jobs/{job['id']}", params={"wait": WAIT_S},
                                      timeout=WAIT_S + 30)
        response.raise_for_status()
        job = response.json()
    return job, time.perf_counter() - started


def closed_loop(url, key, model, max_tokens, number, jobs, deadline):
    """One client: a job, its result, the next; ``jobs`` of them, or (``jobs``
    None) until ``deadline`` (``time.perf_counter()``)."""
    client = Client(url, key, timeout=WAIT_S + 30)
    runs = []
    while (len(runs) < jobs) if jobs else (time.perf_counter() < deadline):
        body = {"model": model, "prompt": f"Client {number}, question {len(runs)}: explain the list type.",
                "params": {"max_tokens": max_tokens, "temperature": 0}}
        runs.append(run_one(client, body))
    client.session.close()
    return runs


def run_level(url, key, model, max_tokens, concurrency, jobs_per_client, duration):
    """``concurrency`` closed-loop clients at once: the level's figures."""
    started = time.perf_counter()
    deadline = started + duration
    with ThreadPoolExecutor(concurrency) as pool:
        per_client = pool.map(
            lambda number: closed_loop(url, key, model, max_tokens, number, jobs_per_client, deadline),
            range(concurrency))
        runs = [run for client_runs in per_client for run in client_runs]
    seconds = time.perf_counter() - started
    jobs = [job for job, _ in runs]
    ok = [job for job in jobs if job["status"] == "succeeded"]
    at = lambda job, name: datetime.fromisoformat(job[name])  # noqa: E731
    if not ok:
        raise RuntimeError(f"no job succeeded at concurrency {concurrency}; the first: {jobs[0]['error']!r}")
    tokens = sum(job["usage"]["completion_tokens"] for job in ok)
    return {
        "concurrency": concurrency,
        "jobs": len(jobs),
        "failed": len(jobs) - len(ok),
        "seconds": round(seconds, 2),
        "jobs_per_s": round(len(ok) / seconds, 2),
        "tokens_per_s": round(tokens / seconds, 1),
        "request_to_result_s": spread([elapsed for job, elapsed in runs if job["status"] == "succeeded"]),
        "latency_s": spread([(at(job, "finished_at") - at(job, "created_at")).total_seconds() for job in ok]),
        "queue_wait_s": spread([(at(job, "started_at") - at(job, "created_at")).total_seconds() for job in ok]),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levels", default=LEVELS, help="concurrency levels, comma-separated")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds each level runs")
    parser.add_argument("--jobs-per-client", type=int, default=None,
                        help="jobs each client runs per level, instead of --duration")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--model", default="tiny-large", choices=["tiny", "tiny-large"])
    args = parser.parse_args()
    levels = parse_levels(args.levels)

    model_dir = resolve_model_dir(args.model, CACHE, log=print)
    with tempfile.TemporaryDirectory() as tmp:
        # A long-poll holds a web thread while it waits: one per client and to spare.
        service = Service(Path(tmp), args.model, model_dir, chunk_rows=64,
                          extra_env={"QUEUE_ENGINE_WEB_THREADS": str(max(64, 2 * max(levels)))})
        try:
            with transaction(service.sessions) as session:
                key = create_api_key(session, f"concurrency-{time.time_ns()}").key
            warm = Client(service.url, key, timeout=600)
            warm.wait_for_job(warm.submit_job({"model": args.model, "prompt": "warm up",
                                               "params": {"max_tokens": 4}})["id"], timeout=600)
            results = []
            for concurrency in levels:
                level = run_level(service.url, key, args.model, args.max_tokens, concurrency, args.jobs_per_client,
                                  args.duration)
                print(f"concurrency {concurrency}: {level['jobs']} jobs, request -> result "
                      f"p50 {level['request_to_result_s']['p50']} s p95 {level['request_to_result_s']['p95']} s, "
                      f"{level['tokens_per_s']} tokens/s", flush=True)
                results.append(level)
        finally:
            service.stop()
    figures = {"benchmark": "concurrency", "model": args.model, "max_tokens": args.max_tokens,
               "jobs_per_client": args.jobs_per_client, "duration_s": None if args.jobs_per_client else args.duration,
               "levels": results}
    save("concurrency", figures)


if __name__ == "__main__":
    main()
