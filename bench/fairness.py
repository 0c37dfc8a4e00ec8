"""Fair share between keys in the bulk lane, on one worker.

Runs on the same service (Redis, `queue-engine serve`, one
`queue-engine worker`), one after the other:

(1) B alone: key B's 200-row batch on the idle worker;
(2) A alone: key A's 20,000-row batch;
(3) both: A's batch, then B's 10 s later, equal shares;
(4) A alone again (the machine's speed drifts: A's time alone is the mean
    of (2) and (4)).

It prints B's completion time in (3) against (1) (goal <= 3x at equal
shares: B gets half the engine from the moment it is accepted), A's total
time in (3) against A alone (goal <= 1.05x: sharing costs the cluster
nothing), and Jain's fairness index of the two keys' throughput (rows/s),
1 being perfectly even (goal >= 0.95), over two spans: while both had rows
running (from B's first row a worker claimed to B's last), and over B's
whole span from its upload. Times come from the database (each batch's
upload to its last row's end). The figures are one JSON object on the last
line.
"""

import argparse
import io
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sqlalchemy import func, select  # noqa: E402

from bench.results import save  # noqa: E402
from bench.throughput import CACHE, PYTHON, cluster_env  # noqa: E402
from queue_engine.apikeys import create_api_key  # noqa: E402
from queue_engine.client import Client  # noqa: E402
from queue_engine.db import make_sessions, transaction  # noqa: E402
from queue_engine.models import Batch, Job  # noqa: E402
from tests.helpers import RedisServer, free_port, stop_process, wait_until, wait_until_serving  # noqa: E402
from workers.engine import resolve_model_dir  # noqa: E402


def csv_of(rows, tag):
    text = "id,prompt\n" + "".join(f"{tag}{i},Write one line about item {i} of list {tag}.\n" for i in range(rows))
    return io.BytesIO(text.encode())


class Service:
    """Redis, `serve` and one worker for ``model``, on a fresh SQLite database;
    ``extra_env``: more ``QUEUE_ENGINE_*`` settings for both."""

    def __init__(self, tmp, model, model_dir, chunk_rows, extra_env=None):
        self.redis = RedisServer(tmp)
        self.env = {**cluster_env(tmp, self.redis.url, model, model_dir, 256,
                                  extra_toml=f"[batches]\nchunk_rows = {chunk_rows}\n"), **(extra_env or {})}
        self.sessions = make_sessions(self.env["QUEUE_ENGINE_DATABASE_URL"])
        self.model = model
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        env = {**os.environ, **self.env}
        self.serve = subprocess.Popen(
            [PYTHON, "-m", "queue_engine.cli", "--log-level", "WARNING", "serve", "--port", str(port)],
            env=env, cwd=ROOT, stdout=open(tmp / "serve.log", "w"), stderr=subprocess.STDOUT)
        self.worker = subprocess.Popen(
            [PYTHON, "-m", "queue_engine.cli", "--log-level", "WARNING", "worker", "--model", model],
            env=env, cwd=ROOT, stdout=open(tmp / "worker.log", "w"), stderr=subprocess.STDOUT)
        wait_until_serving(self.url, self.serve, tmp / "serve.log", 120)

    def client(self, name):
        with transaction(self.sessions) as session:
            return Client(self.url, create_api_key(session, f"{name}-{time.time_ns()}").key, timeout=600)

    def upload(self, client, rows, tag, max_tokens):
        return client.submit_batch(csv_of(rows, tag), self.model, filename=f"{tag}.csv",
                                   params={"max_tokens": max_tokens, "temperature": 0})["id"]

    def wait_done(self, batch_id, timeout=3600):
        def done():
            with self.sessions() as session:
                return session.get(Batch, batch_id).status in ("completed", "failed")
        wait_until(done, timeout, f"batch {batch_id} to finish", 0.5)

    def span(self, batch_id):
        """``(uploaded, last row ended)`` of a batch."""
        with self.sessions() as session:
            batch = session.get(Batch, batch_id)
            ended = session.scalar(select(func.max(Job.finished_at)).where(Job.batch_id == batch_id))
        return batch.created_at, ended

    def first_claimed(self, batch_id):
        with self.sessions() as session:
            return session.scalar(select(func.min(Job.started_at)).where(Job.batch_id == batch_id))

    def seconds(self, batch_id):
        start, end = self.span(batch_id)
        return (end - start).total_seconds()

    def rows_finished(self, batch_id, start, end):
        with self.sessions() as session:
            return session.scalar(select(func.count()).select_from(Job).where(
                Job.batch_id == batch_id, Job.finished_at >= start, Job.finished_at <= end))

    def stop(self):
        stop_process(self.worker)
        stop_process(self.serve)
        self.redis.stop()


def jain(rates):
    return sum(rates) ** 2 / (len(rates) * sum(r * r for r in rates))


def rates_between(service, batch_ids, start, end):
    seconds = (end - start).total_seconds()
    return [service.rows_finished(batch, start, end) / seconds for batch in batch_ids]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows-a", type=int, default=20_000)
    parser.add_argument("--rows-b", type=int, default=200)
    parser.add_argument("--delay", type=float, default=10.0, help="seconds between A's upload and B's")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--model", default="tiny-large", choices=["tiny", "tiny-large"])
    parser.add_argument("--chunk-rows", type=int, default=64, help="rows per bulk-lane message ([batches] chunk_rows)")
    args = parser.parse_args()

    model_dir = resolve_model_dir(args.model, CACHE, log=print)
    with tempfile.TemporaryDirectory() as tmp:
        service = Service(Path(tmp), args.model, model_dir, args.chunk_rows)
        try:
            warm = service.upload(service.client("warm"), 32, "w", args.max_tokens)
            service.wait_done(warm, 300)
            print(f"(1) B alone: {args.rows_b} rows ...", flush=True)
            b_alone = service.upload(service.client("b-alone"), args.rows_b, "b", args.max_tokens)
            service.wait_done(b_alone)
            print(f"(2) A alone: {args.rows_a} rows ...", flush=True)
            a_alone = service.upload(service.client("a-alone"), args.rows_a, "a", args.max_tokens)
            service.wait_done(a_alone)
            print(f"(3) A, then B {args.delay:g} s later ...", flush=True)
            key_a, key_b = service.client("a"), service.client("b")
            a_both = service.upload(key_a, args.rows_a, "a", args.max_tokens)
            time.sleep(args.delay)  # the scenario: B arrives 10 s after A (not synchronisation)
            b_both = service.upload(key_b, args.rows_b, "b", args.max_tokens)
            service.wait_done(b_both)
            service.wait_done(a_both)
            print(f"(4) A alone again: {args.rows_a} rows ...", flush=True)
            a_again = service.upload(service.client("a-again"), args.rows_a, "a", args.max_tokens)
            service.wait_done(a_again)

            b_uploaded, b_end = service.span(b_both)
            running = rates_between(service, (a_both, b_both), service.first_claimed(b_both), b_end)
            whole = rates_between(service, (a_both, b_both), b_uploaded, b_end)
            a_alone_s = (service.seconds(a_alone) + service.seconds(a_again)) / 2
            figures = {
                "benchmark": "fairness", "model": args.model, "rows_a": args.rows_a, "rows_b": args.rows_b,
                "max_tokens": args.max_tokens, "chunk_rows": args.chunk_rows,
                "b_alone_s": round(service.seconds(b_alone), 2),
                "b_shared_s": round(service.seconds(b_both), 2),
                "ratio_b_shared_vs_alone": round(service.seconds(b_both) / service.seconds(b_alone), 2),
                "a_alone_s": [round(service.seconds(a_alone), 1), round(service.seconds(a_again), 1)],
                "a_shared_s": round(service.seconds(a_both), 1),
                "ratio_a_shared_vs_alone": round(service.seconds(a_both) / a_alone_s, 3),
                "rows_per_s_while_both_run": {"a": round(running[0], 1), "b": round(running[1], 1)},
                "jain_while_both_run": round(jain(running), 3),
                "rows_per_s_from_b_upload": {"a": round(whole[0], 1), "b": round(whole[1], 1)},
                "jain_from_b_upload": round(jain(whole), 3),
            }
        finally:
            service.stop()
    save("fairness", figures)


if __name__ == "__main__":
    main()
