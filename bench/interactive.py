"""Interactive jobs beside bulk work, with the bulk-seat policy on and off, side by side in one run.

For each setting of the profile's ``bulk_seats_with_interactive`` (its
default, and off = max_in_flight), on a fresh `queue-engine worker`:

(1) interactive jobs (16 tokens, greedy) one after another on the idle worker:
    created -> finished p50;
(2) a batch backlog (``--backlog-rows`` rows x 32 tokens) starts; bulk rows/s
    with no interactive work (the unloaded rate);
(3) interactive jobs one after another behind the backlog: created -> finished
    p50, against (1);
(4) interactive jobs arriving at a steady rate (``--rate`` per second, not
    waiting for each other) behind the backlog: bulk rows/s meanwhile, against
    (2), and those jobs' created -> finished p50.

Prints the figures as one JSON object on its last line.

    python bench/interactive.py [--backlog-rows 20000] [--rate 1] [--seats default,off]
"""

import argparse
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sqlalchemy import func, select  # noqa: E402

from bench.batches import Service, latencies, percentile, redis_flush, write_csv  # noqa: E402
from bench.results import save  # noqa: E402
from bench.throughput import CACHE, cluster_env, make_prompts  # noqa: E402
from queue_engine.models import Job  # noqa: E402
from queue_engine.settings import ModelProfile, load_settings  # noqa: E402
from tests.helpers import RedisServer, wait_until  # noqa: E402
from workers.engine import resolve_model_dir  # noqa: E402

DEFAULT_SEATS = ModelProfile().bulk_seats_with_interactive
TOKENS = 16


def p50_ms(runs):
    return round(1000 * statistics.median(run[1] for run in runs), 1)


def p95_ms(runs):
    return round(1000 * percentile([run[1] for run in runs], 95), 1)


def completed(service, batch_id):
    return service.client.get_batch(batch_id)["request_counts"]["completed"]


def bulk_rate(service, batch_id, seconds, during=None):
    """Bulk rows finished per second over ``seconds`` (by their finished_at); ``during(deadline)`` runs meanwhile."""
    start = datetime.now(timezone.utc)
    result = during(time.perf_counter() + seconds) if during else time.sleep(seconds)
    end = datetime.now(timezone.utc)
    time.sleep(2)  # rows that finished in the window are written a moment later
    with service.app.extensions["qe_sessions"]() as session:
        rows = session.scalar(select(func.count()).select_from(Job).where(
            Job.batch_id == batch_id, Job.finished_at >= start, Job.finished_at < end))
    return rows / (end - start).total_seconds(), result


def steady_arrivals(service, rate):
    """Submit one interactive job every 1/rate s until the deadline; returns their ids."""
    def run(deadline):
        ids, next_at = [], time.perf_counter()
        while next_at < deadline:
            time.sleep(max(0.0, next_at - time.perf_counter()))
            ids.append(service.client.submit_job({
                "model": service.model, "prompt": f"Quick question {len(ids)}?",
                "params": {"max_tokens": TOKENS, "temperature": 0}})["id"])
            next_at += 1 / rate
        time.sleep(max(0.0, deadline - time.perf_counter()))
        return ids
    return run


def one_setting(name, seats, args, model_dir, redis, tmp):
    directory = tmp / name
    directory.mkdir()
    extra = f"bulk_seats_with_interactive = {seats}\n"
    env = cluster_env(directory, redis.url, args.model, model_dir, args.max_in_flight, extra_toml=extra)
    service = Service(env, load_settings(environ=env), args.model, directory / "worker.log")
    figures = {}
    try:
        print(f"[{name}] (1) {args.jobs} interactive jobs on the idle worker ...", flush=True)
        idle = [latencies(service.run_job(f"Quick question {i}?", TOKENS)) for i in range(args.jobs)]
        path = directory / "backlog.csv"
        write_csv(path, make_prompts(args.backlog_rows))
        batch = service.client.submit_batch(path, service.model, params={"max_tokens": 32, "temperature": 0})
        wait_until(lambda: completed(service, batch["id"]) > 0, 600, "the backlog to be running")
        time.sleep(2)  # past the first rows' start
        print(f"[{name}] (2) bulk rows/s, unloaded, over {args.window} s ...", flush=True)
        unloaded, _ = bulk_rate(service, batch["id"], args.window)
        print(f"[{name}] (3) {args.jobs} interactive jobs one after another behind the backlog ...", flush=True)
        busy = [latencies(service.run_job(f"Quick question {i}?", TOKENS)) for i in range(args.jobs)]
        print(f"[{name}] (4) interactive jobs at {args.rate}/s for {args.window} s behind the backlog ...", flush=True)
        loaded, ids = bulk_rate(service, batch["id"], args.window, steady_arrivals(service, args.rate))
        steady = [latencies(service.client.wait_for_job(i, timeout=600, interval=0.05)) for i in ids]
        left = service.client.cancel_batch(batch["id"])["request_counts"]
        assert left["cancelled"] > 0, "the backlog ran out during the measurement: raise --backlog-rows"
        figures.update({
            "idle_total_p50_ms": p50_ms(idle),
            "behind_backlog_total_p50_ms": p50_ms(busy),
            "behind_backlog_total_p95_ms": p95_ms(busy),
            "ratio_behind_backlog_vs_idle": round(p50_ms(busy) / p50_ms(idle), 2),
            "bulk_rows_per_s_unloaded": round(unloaded, 1),
            "bulk_rows_per_s_with_interactive": round(loaded, 1),
            "ratio_bulk_with_interactive_vs_unloaded": round(loaded / unloaded, 3),
            "steady_jobs": len(ids),
            "steady_total_p50_ms": p50_ms(steady),
            "steady_total_p95_ms": p95_ms(steady),
        })
    finally:
        service.stop()
        redis_flush(redis)
    return figures


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backlog-rows", type=int, default=20_000)
    parser.add_argument("--jobs", type=int, default=20, help="interactive jobs in (1) and (3)")
    parser.add_argument("--rate", type=float, default=1.0, help="interactive jobs per second in (4)")
    parser.add_argument("--window", type=float, default=30.0, help="seconds over which bulk rows/s are counted")
    parser.add_argument("--seats", default="default,off",
                        help="bulk_seats_with_interactive values to compare: numbers, 'default' or 'off'")
    parser.add_argument("--model", default="tiny-large", choices=["tiny", "tiny-large"])
    parser.add_argument("--max-in-flight", type=int, default=256)
    args = parser.parse_args()

    model_dir = resolve_model_dir(args.model, CACHE, log=print)
    figures = {"benchmark": "interactive", "model": args.model, "backlog_rows": args.backlog_rows,
               "interactive_tokens": TOKENS, "bulk_tokens": 32, "rate_per_s": args.rate, "window_s": args.window}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        redis = RedisServer(tmp)
        try:
            for value in args.seats.split(","):
                seats = {"default": DEFAULT_SEATS, "off": args.max_in_flight}.get(value) or int(value)
                name = f"seats_{seats}" if seats < args.max_in_flight else "off"
                for key, figure in one_setting(name, seats, args, model_dir, redis, tmp).items():
                    figures[f"{name}.{key}"] = figure
        finally:
            redis.stop()
    save("interactive", figures)


if __name__ == "__main__":
    main()
