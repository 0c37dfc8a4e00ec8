"""Tribunal latency under overload, side by side in one run.

One `queue-engine worker` serves the model. First its bulk rate is measured
(rows per second through a calibration batch). Then a batch of about four
times what it finishes in the test window is queued, and while that backlog
is running, rounds of three requests are submitted together, each round:

- a plain single job,
- a tribunal with ``bypass: auto`` (two candidates, a judge, the judge revises),
- the same tribunal with ``bypass: never``,

all asking for the same number of tokens per step. Latency is created ->
finished. A few rounds on the idle worker come first, for reference.

Prints the figures as one JSON object on its last line.

    python bench/tribunal.py [--database-url postgresql+psycopg://...] [--window 180]
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

from bench.batches import Service, percentile, write_csv  # noqa: E402
from bench.results import save  # noqa: E402
from bench.throughput import CACHE, cluster_env, make_prompts  # noqa: E402
from queue_engine.settings import load_settings  # noqa: E402
from tests.helpers import RedisServer, wait_until  # noqa: E402
from workers.engine import resolve_model_dir  # noqa: E402

KINDS = ("single", "auto", "never")


def submit(client, kind, model, number, max_tokens):
    """Submit one request of ``kind`` and wait for it; returns the finished job."""
    params = {"max_tokens": max_tokens, "temperature": 0.7}
    prompt = f"Quick question {number}: what does a list comprehension return?"
    if kind == "single":
        job = client.submit_job({"model": model, "prompt": prompt, "params": params})
    else:
        job = client.submit_tribunal({"prompt": prompt, "candidates": [model, model], "judge": model,
                                      "bypass": kind, "params": params})
    done = client.wait_for_job(job["id"], timeout=600, interval=0.02)
    assert done["status"] == "succeeded", done
    return done


def seconds(job):
    return (datetime.fromisoformat(job["finished_at"]) - datetime.fromisoformat(job["created_at"])).total_seconds()


def run_rounds(service, max_tokens, first_number, rounds=None, until=None):
    """Rounds of one request of each kind at once, ``rounds`` of them or
    until ``until`` (a ``time.monotonic()``); returns ``{kind: [finished jobs]}``."""
    done = {kind: [] for kind in KINDS}
    number = first_number
    with ThreadPoolExecutor(len(KINDS)) as pool:
        while (len(done["single"]) < rounds) if rounds is not None else (time.monotonic() < until):
            futures = {kind: pool.submit(submit, service.client, kind, service.model, number, max_tokens)
                       for kind in KINDS}
            for kind, future in futures.items():
                done[kind].append(future.result())
            number += 1
    return done


def summarise(done, label):
    figures = {}
    for kind, jobs in done.items():
        values = [seconds(job) for job in jobs]
        figures[f"{label}_{kind}_p50_s"] = round(statistics.median(values), 3)
        figures[f"{label}_{kind}_p95_s"] = round(percentile(values, 95), 3)
    figures[f"{label}_rounds"] = len(done["single"])
    figures[f"{label}_auto_bypassed"] = sum(job["tribunal"]["bypassed"] for job in done["auto"])
    return figures


def bulk_rate(service, rows, max_tokens, tmp):
    """Rows per second the worker finishes through a batch of ``rows`` rows."""
    path = tmp / "calibrate.csv"
    write_csv(path, make_prompts(rows))
    batch = service.client.submit_batch(path, service.model, params={"max_tokens": max_tokens, "temperature": 0})
    done = service.client.wait_for_batch(batch["id"], timeout=3600, interval=0.5)
    elapsed = (datetime.fromisoformat(done["completed_at"]) - datetime.fromisoformat(batch["created_at"])).total_seconds()
    return rows / elapsed


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--window", type=float, default=180, help="seconds of rounds under overload")
    parser.add_argument("--idle-rounds", type=int, default=5)
    parser.add_argument("--overload", type=float, default=4.0, help="backlog / rows finished in the window")
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens per step and per request")
    parser.add_argument("--backlog-max-tokens", type=int, default=32)
    parser.add_argument("--model", default="tiny-large", choices=["tiny", "tiny-large"])
    parser.add_argument("--max-in-flight", type=int, default=256)
    parser.add_argument("--database-url", default=None, help="default: a SQLite file in a temporary directory")
    args = parser.parse_args()

    model_dir = resolve_model_dir(args.model, CACHE, log=print)
    figures = {"benchmark": "tribunal", "model": args.model, "max_tokens_per_step": args.max_tokens}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        redis = RedisServer(tmp)
        env = cluster_env(tmp, redis.url, args.model, model_dir, args.max_in_flight, args.database_url)
        settings = load_settings(environ=env)
        figures["database"] = settings.sqlalchemy_url.split(":")[0]
        figures["bypass_backlog"] = settings.tribunal.bypass_backlog
        service = Service(env, settings, args.model, tmp / "worker.log")
        try:
            print(f"{args.idle_rounds} rounds on the idle worker ...", flush=True)
            figures.update(summarise(run_rounds(service, args.max_tokens, 0, rounds=args.idle_rounds), "idle"))

            print("measuring the worker's bulk rate ...", flush=True)
            rate = bulk_rate(service, 2048, args.backlog_max_tokens, tmp)
            backlog_rows = round(args.overload * rate * args.window)
            figures["bulk_rows_per_s"] = round(rate, 1)
            figures["backlog_rows"] = backlog_rows

            path = tmp / "backlog.csv"
            write_csv(path, make_prompts(backlog_rows))
            batch = service.client.submit_batch(path, service.model,
                                                params={"max_tokens": args.backlog_max_tokens, "temperature": 0})
            wait_until(lambda: service.client.get_batch(batch["id"])["request_counts"]["completed"] > 0, 600,
                       "the backlog to be running")
            print(f"rounds for {args.window:.0f} s behind a {backlog_rows}-row backlog ...", flush=True)
            started = time.monotonic()
            completed_before = service.client.get_batch(batch["id"])["request_counts"]["completed"]
            busy = run_rounds(service, args.max_tokens, 1000, until=started + args.window)
            window = time.monotonic() - started
            completed = service.client.get_batch(batch["id"])["request_counts"]["completed"] - completed_before
            left = service.client.cancel_batch(batch["id"])["request_counts"]
            figures.update(summarise(busy, "overload"))
            figures["window_s"] = round(window, 1)
            figures["backlog_rows_done_in_window"] = completed
            figures["overload_factor"] = round(backlog_rows / max(completed, 1), 1)
            figures["backlog_rows_left_after"] = left["cancelled"]
            single = figures["overload_single_p95_s"]
            figures["ratio_auto_p95_vs_single_p95"] = round(figures["overload_auto_p95_s"] / single, 2)
            figures["ratio_never_p95_vs_single_p95"] = round(figures["overload_never_p95_s"] / single, 2)
            figures["ratio_idle_never_p95_vs_single_p95"] = round(
                figures["idle_never_p95_s"] / figures["idle_single_p95_s"], 2)
        finally:
            service.stop()
            redis.stop()
    save("tribunal", figures)


if __name__ == "__main__":
    main()
