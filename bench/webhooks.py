"""Webhook reliability and cost, measured in one run.

One `queue-engine worker` serves the tiny model, `queue-engine serve` (cluster
mode) delivers webhooks, and a receiver on loopback verifies every signature
with the ``standardwebhooks`` library.

0. Latency when idle: jobs one at a time, job finished -> event received.
1. Cost, side by side: N jobs without a webhook, then N jobs with one (the
   receiver up). Jobs per second for each; CPU time per job of the worker
   process (its engine core is a child process, not counted) and per event
   of the delivering `serve`; and the delivery latency (job finished -> the
   receiver had the event). Everything shares this machine's cores, the
   receiver and the web sharing one Python process with the submitting threads.
2. Reliability: N more jobs with a webhook while the receiver is down for
   ``--down`` seconds. Then: was every event delivered after it came back,
   was any delivered twice after a 2xx, did every signature verify?
3. The outbox's own cost, side by side: the transaction that ends a job,
   without and with its event written in it (last: its events go nowhere).

Prints the figures as one JSON object on its last line.

    python bench/webhooks.py [--jobs 500] [--down 60] [--database-url postgresql+psycopg://...]
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sqlalchemy import func, select  # noqa: E402

from bench.batches import Service, percentile  # noqa: E402
from bench.results import save  # noqa: E402
from bench.throughput import cluster_env  # noqa: E402
from queue_engine.apikeys import create_api_key  # noqa: E402
from queue_engine.client import Client  # noqa: E402
from queue_engine.db import make_sessions, transaction  # noqa: E402
from queue_engine import jobs, leases  # noqa: E402
from queue_engine.models import ApiKey, Job, WebhookEvent  # noqa: E402
from queue_engine.schemas import JobCreate  # noqa: E402
from queue_engine.settings import load_settings  # noqa: E402
from tests.helpers import RedisServer, free_port, spawn, stop_process, wait_until  # noqa: E402
from tests.integration.conftest import MODEL_CACHE  # noqa: E402
from tests.receiver import Receiver  # noqa: E402
from workers.engine import Generation, resolve_model_dir  # noqa: E402

#: The retry schedule of this run: exponential from 1 s, so a 60 s outage
#: costs a handful of attempts per event and ends within one more delay.
RETRY_DELAYS = "1,2,4,8,16,32,64,128"


def submit_all(client, count, max_tokens, webhook_url, threads=16):
    """Submit ``count`` jobs from ``threads`` threads; returns their ids."""
    def one(number):
        body = {"model": "tiny", "prompt": f"Say something about the number {number}",
                "params": {"max_tokens": max_tokens}}
        if webhook_url:
            body["webhook_url"] = webhook_url
        return client.submit_job(body)["id"]

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(one, range(count)))


def wait_finished(sessions, job_ids, timeout=1200):
    def finished():
        with sessions() as session:
            return session.scalar(select(func.count(Job.id)).where(
                Job.id.in_(job_ids), Job.status.in_(["succeeded", "failed"]))) == len(job_ids)
    wait_until(finished, timeout, f"{len(job_ids)} jobs to finish", 0.2)


def run_jobs(client, sessions, count, max_tokens, webhook_url=None):
    """Submit and finish ``count`` jobs; returns ``(ids, jobs per second)``."""
    started = time.monotonic()
    job_ids = submit_all(client, count, max_tokens, webhook_url)
    wait_finished(sessions, job_ids)
    return job_ids, count / (time.monotonic() - started)


def events_of(sessions, job_ids):
    with sessions() as session:
        return {row.job_id: row for row in session.execute(
            select(WebhookEvent.job_id, WebhookEvent.id, WebhookEvent.status, WebhookEvent.attempts)
            .where(WebhookEvent.job_id.in_(job_ids)))}


def finished_at(sessions, job_ids):
    with sessions() as session:
        return dict(session.execute(select(Job.id, Job.finished_at).where(Job.id.in_(job_ids))).all())


def wait_delivered(sessions, job_ids, timeout):
    def delivered():
        return sum(e.status == "delivered" for e in events_of(sessions, job_ids).values()) == len(job_ids)
    wait_until(delivered, timeout, f"{len(job_ids)} webhooks to be delivered", 0.2)


def idle_latency(client, sessions, receiver, count, max_tokens):
    """Job finished -> event received, for jobs run one at a time."""
    latencies = []
    for number in range(count):
        [job_id] = submit_all(client, 1, max_tokens, receiver.url, threads=1)
        wait_delivered(sessions, [job_id], 60)
        event = events_of(sessions, [job_id])[job_id]
        [arrived] = [d for d in receiver.accepted() if d.webhook_id == event.id]
        latencies.append(arrived.wall - finished_at(sessions, [job_id])[job_id].timestamp())
    return latencies


def outbox_cost(sessions, owner_id, settings, count):
    """Seconds per job-ending transaction without and with the event written
    in it: ``leases.finish`` of one job, as a worker writes an interactive
    outcome, for jobs without a ``webhook_url`` and then with one."""
    def claimed_jobs(webhook_url):
        with transaction(sessions) as session:
            request = JobCreate(model="tiny", prompt="x", webhook_url=webhook_url)
            ids = [jobs.create_job(session, owner_id, request, settings)[0].id for _ in range(count)]
        with transaction(sessions) as session:
            return leases.claim(session, "bench", 600, job_ids=ids)

    def end_all(items):
        started = time.perf_counter()
        for item in items:
            with transaction(sessions) as session:
                leases.finish(session, "bench", [leases.Outcome(item, Generation("text", "stop", 1, 1))], settings)
        return (time.perf_counter() - started) / len(items)

    plain, announced = claimed_jobs(None), claimed_jobs("http://127.0.0.1:9/hook")
    return end_all(plain), end_all(announced)


def cpu_seconds(pid):
    """User + system CPU time the process ``pid`` has used so far."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def audit(receiver, events):
    """What the receiver saw of ``events`` (``{job_id: event row}``)."""
    by_id = {event.id: job_id for job_id, event in events.items()}
    seen = [d for d in receiver.deliveries if d.webhook_id in by_id]
    accepted = Counter(d.webhook_id for d in seen if 200 <= d.status < 300)
    after_2xx = 0
    for webhook_id in accepted:
        first_ok = next(d.at for d in seen if d.webhook_id == webhook_id and 200 <= d.status < 300)
        after_2xx += sum(1 for d in seen if d.webhook_id == webhook_id and d.at > first_ok)
    return {
        "events": len(events),
        "delivered": len(accepted),
        "accepted_twice": sum(1 for n in accepted.values() if n > 1),
        "requests_after_a_2xx": after_2xx,
        "bad_signatures": sum(1 for d in seen if not d.verified_by),
        "job_ids_match": all(d.body["data"]["id"] == by_id[d.webhook_id] for d in seen),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--down", type=float, default=60, help="seconds the receiver is down in part 2")
    parser.add_argument("--max-tokens", type=int, default=4)
    parser.add_argument("--idle-jobs", type=int, default=20)
    parser.add_argument("--settle", type=float, default=10, help="seconds to watch for stray requests at the end")
    parser.add_argument("--database-url", default=None, help="default: a SQLite file in a temporary directory")
    args = parser.parse_args()

    model_dir = resolve_model_dir("tiny", MODEL_CACHE, log=print)
    figures = {"benchmark": "webhooks", "jobs": args.jobs, "receiver_down_s": args.down,
               "retry_delays": RETRY_DELAYS}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        redis = RedisServer(tmp)
        env = {**cluster_env(tmp, redis.url, "tiny", model_dir, 256, args.database_url),
               "QUEUE_ENGINE_WEBHOOK_ALLOW": "127.0.0.0/8", "QUEUE_ENGINE_WEBHOOK_RETRY_DELAYS": RETRY_DELAYS}
        settings = load_settings(environ=env)
        figures["database"] = settings.sqlalchemy_url.split(":")[0]
        sessions = make_sessions(settings.sqlalchemy_url)
        service = Service(env, settings, "tiny", tmp / "worker.log")
        delivery = spawn(["--log-level", "WARNING", "serve", "--port", str(free_port())], env, tmp / "serve.log")
        with transaction(sessions) as session:
            key = create_api_key(session, "bench-webhooks")
        client = Client(service.client.url, key.key, timeout=600)
        receiver = Receiver(secrets=[key.webhook_secret])
        try:
            print(f"0. {args.idle_jobs} jobs one at a time, each waiting for its webhook ...", flush=True)
            figures["idle_delivery_latency_p50_s"] = round(statistics.median(
                idle_latency(client, sessions, receiver, args.idle_jobs, args.max_tokens)), 3)

            print(f"1. {args.jobs} jobs without a webhook, then {args.jobs} with one ...", flush=True)
            worker_cpu = cpu_seconds(service.worker.pid)
            _, plain_rate = run_jobs(client, sessions, args.jobs, args.max_tokens)
            worker_cpu, worker_cpu_plain = cpu_seconds(service.worker.pid), cpu_seconds(service.worker.pid) - worker_cpu
            delivery_cpu = cpu_seconds(delivery.pid)
            hooked, hooked_rate = run_jobs(client, sessions, args.jobs, args.max_tokens, receiver.url)
            worker_cpu_hooked = cpu_seconds(service.worker.pid) - worker_cpu
            wait_delivered(sessions, hooked, 300)
            per_job = 1000 / args.jobs
            figures["worker_cpu_ms_per_job_without"] = round(worker_cpu_plain * per_job, 2)
            figures["worker_cpu_ms_per_job_with"] = round(worker_cpu_hooked * per_job, 2)
            figures["delivery_cpu_ms_per_event"] = round((cpu_seconds(delivery.pid) - delivery_cpu) * per_job, 2)
            events = events_of(sessions, hooked)
            ended = finished_at(sessions, hooked)
            arrived = {d.webhook_id: d.wall for d in receiver.accepted()}
            latency = [arrived[events[job_id].id] - ended[job_id].timestamp() for job_id in hooked]
            figures.update({
                "jobs_per_s_without_webhooks": round(plain_rate, 1),
                "jobs_per_s_with_webhooks": round(hooked_rate, 1),
                "ratio_with_vs_without": round(hooked_rate / plain_rate, 3),
                "delivery_latency_p50_s": round(statistics.median(latency), 3),
                "delivery_latency_p95_s": round(percentile(latency, 95), 3),
                "part1": audit(receiver, events),
            })

            print(f"2. {args.jobs} jobs while the receiver is down for {args.down:.0f} s ...", flush=True)
            receiver.stop()
            down_at = time.monotonic()
            outage, _ = run_jobs(client, sessions, args.jobs, args.max_tokens, receiver.url)
            figures["jobs_finished_while_down_s"] = round(time.monotonic() - down_at, 1)
            time.sleep(max(0.0, args.down - (time.monotonic() - down_at)))  # the outage itself
            refused = sum(e.attempts for e in events_of(sessions, outage).values())
            receiver.start()
            back_at = time.monotonic()
            wait_delivered(sessions, outage, 600)
            figures["all_delivered_after_return_s"] = round(time.monotonic() - back_at, 1)
            time.sleep(args.settle)  # watch for any request after the 2xx
            events = events_of(sessions, outage)
            figures["attempts_refused_while_down"] = refused
            figures["attempts_per_event_max"] = max(e.attempts for e in events.values())
            figures["part2"] = audit(receiver, events)

            print(f"3. the job-ending transaction without and with its event, {args.jobs} each ...", flush=True)
            stop_process(delivery)  # so that nothing else writes meanwhile
            with sessions() as session:
                owner_id = session.scalar(select(ApiKey.id).where(ApiKey.name == "bench-webhooks"))
            without, with_event = outbox_cost(sessions, owner_id, settings, args.jobs)
            figures["end_transaction_ms_without_event"] = round(without * 1000, 3)
            figures["end_transaction_ms_with_event"] = round(with_event * 1000, 3)
            figures["ratio_end_transaction_with_vs_without"] = round(with_event / without, 2)
        finally:
            receiver.stop()
            stop_process(delivery)
            service.stop()
            redis.stop()
    save("webhooks", figures)


if __name__ == "__main__":
    main()
