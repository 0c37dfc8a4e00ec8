"""The web tier under load: many pollers and submitters against cluster mode
with the production server (`queue-engine serve --workers N`: gunicorn),
twice side by side:

(a) plain polling: each poller GETs its job, waits ``--think`` seconds, again;
(b) long-poll: each poller GETs its job with ``?wait=S``, waits ``--think``, again.

A real redis-server on a free port, a SQLite file (or ``--database-url``),
no worker: the jobs stay queued, so a long-poll always runs to its deadline
(the most requests it can cost). Submitters POST a job, wait ``--think``,
again. The load generator is this process (asyncio + aiohttp), apart from
the server's processes.

Prints errors, GET and POST p50/p99, requests per second and the requests
each mode needed, as one JSON object on its last line.

    python bench/load.py [--pollers 1000] [--submitters 200] [--duration 60] [--workers 2]
                         [--wait 10] [--database-url postgresql+psycopg://...]
"""

import argparse
import asyncio
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402

from bench.results import save  # noqa: E402
from queue_engine.apikeys import create_api_key  # noqa: E402
from queue_engine.db import make_sessions, transaction, upgrade_database  # noqa: E402
from tests.helpers import RedisServer, free_port, spawn, stop_process, wait_until_serving  # noqa: E402

#: Seconds a request may take before it counts as an error.
REQUEST_TIMEOUT = 120


def percentile(values, fraction):
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(fraction * len(ordered)) - 1)]


class Tally:
    """What one mode's clients saw."""

    def __init__(self):
        self.get_ms, self.post_ms, self.errors, self.error_kinds = [], [], 0, {}

    def error(self, kind):
        self.errors += 1
        self.error_kinds[kind] = self.error_kinds.get(kind, 0) + 1

    def summary(self, seconds, wait):
        requests = len(self.get_ms) + len(self.post_ms)
        ms = lambda values, q: None if not values else round(percentile(values, q), 1)  # noqa: E731
        return {
            "wait_s": wait, "errors": self.errors, "error_kinds": self.error_kinds,
            "requests": requests, "get_requests": len(self.get_ms), "post_requests": len(self.post_ms),
            "requests_per_s": round(requests / seconds, 1),
            "get_p50_ms": ms(self.get_ms, 0.5), "get_p99_ms": ms(self.get_ms, 0.99),
            "post_p50_ms": ms(self.post_ms, 0.5), "post_p99_ms": ms(self.post_ms, 0.99),
        }


async def timed(session, method, url, tally, samples, **kwargs):
    """One request; its milliseconds into ``samples`` when it answers 2xx, else an error. Returns the JSON."""
    start = time.monotonic()
    try:
        async with session.request(method, url, **kwargs) as response:
            body = await response.json(content_type=None)
            if response.status >= 300:
                tally.error(f"http_{response.status}")
                return None
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as e:
        tally.error(type(e).__name__)
        return None
    samples.append((time.monotonic() - start) * 1000)
    return body


async def poller(session, url, job_id, think, wait, deadline, tally):
    query = f"?wait={wait:g}" if wait else ""
    while time.monotonic() < deadline:
        await timed(session, "GET", f"{url}/api/v1/jobs/{job_id}{query}", tally, tally.get_ms)
        await asyncio.sleep(think)


async def submitter(session, url, think, deadline, tally):
    while time.monotonic() < deadline:
        await timed(session, "POST", f"{url}/api/v1/jobs", tally, tally.post_ms,
                    json={"model": "tiny", "prompt": "Hello", "params": {"max_tokens": 8}})
        await asyncio.sleep(think)


def new_session(key):
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    return aiohttp.ClientSession(connector=connector, headers={"Authorization": f"Bearer {key}"},
                                 timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT))


async def create_jobs(url, key, count):
    """The pollers' jobs, created before the clock starts (not counted)."""
    tally, ids = Tally(), []
    async with new_session(key) as session:
        semaphore = asyncio.Semaphore(50)

        async def create():
            async with semaphore:
                body = await timed(session, "POST", f"{url}/api/v1/jobs", tally, [],
                                   json={"model": "tiny", "prompt": "poll me", "params": {"max_tokens": 8}})
                if body:
                    ids.append(body["id"])

        await asyncio.gather(*(create() for _ in range(count)))
    if tally.errors:
        raise RuntimeError(f"{tally.errors} of {count} setup submissions failed: {tally.error_kinds}")
    return ids


async def run_mode(url, key, job_ids, args, wait):
    """One mode for ``args.duration`` seconds; its tally's summary."""
    tally = Tally()
    async with new_session(key) as session:
        start = time.monotonic()
        deadline = start + args.duration
        # Spread the clients' first requests over one think time, as clients arriving would.
        async def later(delay, coroutine):
            await asyncio.sleep(delay)
            await coroutine

        clients = [later(args.think * i / len(job_ids), poller(session, url, job_id, args.think, wait, deadline, tally))
                   for i, job_id in enumerate(job_ids)]
        clients += [later(args.think * i / max(1, args.submitters), submitter(session, url, args.think, deadline, tally))
                    for i in range(args.submitters)]
        await asyncio.gather(*clients)
        elapsed = time.monotonic() - start
    return tally.summary(elapsed, wait)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pollers", type=int, default=1000)
    parser.add_argument("--submitters", type=int, default=200)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds per mode")
    parser.add_argument("--think", type=float, default=1.0, help="seconds a client waits between its requests")
    parser.add_argument("--wait", type=float, default=10.0, help="the long-poll's ?wait= in seconds")
    parser.add_argument("--workers", type=int, default=2, help="gunicorn processes (serve --workers)")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads per web process; default enough for every client to wait at once")
    parser.add_argument("--database-url", default=None, help="default: a SQLite file in a temporary directory")
    parser.add_argument("--modes", default="plain,wait", help="which modes to run, in order")
    args = parser.parse_args()
    threads = args.threads or math.ceil((args.pollers + args.submitters) / args.workers) + 50

    with tempfile.TemporaryDirectory(prefix="qe-load-") as tmp:
        tmp = Path(tmp)
        redis_server = RedisServer(tmp)
        database_url = args.database_url or f"sqlite:///{tmp / 'bench.db'}"
        upgrade_database(database_url)
        port = free_port()
        env = {"QUEUE_ENGINE_BROKER_URL": redis_server.url, "QUEUE_ENGINE_DATABASE_URL": database_url,
               "QUEUE_ENGINE_DATA_DIR": str(tmp / "data"), "QUEUE_ENGINE_WEB_THREADS": str(threads),
               "QUEUE_ENGINE_MAX_WAIT": str(max(30.0, args.wait)), "QUEUE_ENGINE_LOG_LEVEL": "WARNING"}
        log_path = tmp / "serve.log"
        server = spawn(["serve", "--port", str(port), "--workers", str(args.workers)], env, log_path)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_until_serving(url, server, log_path, 60)
            with transaction(make_sessions(database_url)) as session:
                key = create_api_key(session, f"load-{time.time_ns()}").key
            job_ids = asyncio.run(create_jobs(url, key, args.pollers))
            results = {}
            for mode in args.modes.split(","):
                wait = args.wait if mode == "wait" else 0
                results[mode] = asyncio.run(run_mode(url, key, job_ids, args, wait))
                print(f"{mode}: {json.dumps(results[mode])}", flush=True)
        except BaseException:
            print(log_path.read_text()[-4000:], file=sys.stderr)
            raise
        finally:
            stop_process(server)
            redis_server.stop()
    figures = {
        "pollers": args.pollers, "submitters": args.submitters, "duration_s": args.duration, "think_s": args.think,
        "web_processes": args.workers, "threads_per_process": threads, "cpus": os.cpu_count(),
        "database": "postgresql" if args.database_url and args.database_url.startswith("postgresql") else "sqlite",
        **results,
    }
    if "plain" in results and "wait" in results:
        figures["wait_get_requests_over_plain"] = round(
            results["wait"]["get_requests"] / max(1, results["plain"]["get_requests"]), 3)
    save("load", figures)


if __name__ == "__main__":
    main()
