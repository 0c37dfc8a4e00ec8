"""What survives each fault: accepted work under fire, on SQLite and PostgreSQL in one run.

For each database, the rig of tests/chaos.py: a redis-server and (for
PostgreSQL) a cluster of this run's own, `queue-engine serve`, one
`queue-engine worker` (vLLM, CPU build, tiny model) and a webhook receiver.
Then, one after another, the mix of work with no fault (single jobs, a third
of them with a webhook, a tribunal, a batch), and each fault while such a mix
is in flight:

- redis_restarted_empty: Redis SIGKILLed, back empty after ``--outage`` s;
- redis_down_while_submitting: the mix submitted while Redis is down;
- postgres_restarted (PostgreSQL only): the database stopped for three
  leases, every connection closed, then started again;
- worker_killed_while_taking: a second worker SIGKILLed while it takes
  messages from a deep queue, three times;
- killed_between_commit_and_send: `serve` dying right after committing a job
  and a batch, a worker right after committing a tribunal's next step.

For each: items accepted and ended, lost (never ended; the promise is 0), run
twice (an engine finished a generation that was not stored as its result;
the promise is 0), webhook events delivered, seconds from the fault's end to
the last item's end, and from the first submission to the last end (compare
with ``no_fault``: the difference is what the fault cost). Prints one JSON
object last.

    python bench/chaos.py [--jobs 30] [--rows 2000] [--lease 5] [--outage 5]
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.results import save  # noqa: E402
from tests.chaos import (  # noqa: E402
    Rig,
    killed_between_commit_and_send,
    no_fault,
    postgres_restarted,
    redis_down_while_submitting,
    redis_restarted_empty,
    worker_killed_while_taking,
)
from tests.helpers import RedisServer  # noqa: E402
from tests.integration.conftest import MODEL_CACHE  # noqa: E402
from tests.postgres import PostgresServer  # noqa: E402
from workers.engine import resolve_model_dir  # noqa: E402


def run_faults(database, model_dir, args):
    """Every fault on one database; returns ``{fault: figures}``."""
    directory = Path(tempfile.mkdtemp(prefix=f"qe-chaos-{database}-"))
    postgres = PostgresServer() if database == "postgresql" else None
    url = postgres.url if postgres else f"sqlite:///{directory / 'queue-engine.db'}"
    redis = RedisServer(directory)
    rig = Rig(directory, model_dir, url, redis, lease_seconds=args.lease)
    mix = {"jobs": args.jobs, "rows": args.rows, "max_tokens": args.max_tokens}
    results = {}
    try:
        rig.start_serve()
        rig.start_worker()
        started = time.monotonic()
        results["no_fault"] = no_fault(rig, **mix)
        results["redis_restarted_empty"] = redis_restarted_empty(rig, outage=args.outage, **mix)
        results["redis_down_while_submitting"] = redis_down_while_submitting(rig, outage=args.outage, **mix)
        if postgres is not None:
            results["postgres_restarted"] = postgres_restarted(rig, postgres, outage=3 * args.lease, **mix)
        results["worker_killed_while_taking"] = worker_killed_while_taking(rig, kills=3, jobs=args.deep_jobs)
        results["killed_between_commit_and_send"] = killed_between_commit_and_send(rig)
        print(f"{database}: {json.dumps(results)} ({time.monotonic() - started:.0f} s)", flush=True)
    finally:
        rig.close()
        redis.process.kill()
        if postgres is not None:
            postgres.destroy()
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=30, help="single jobs in each mix")
    parser.add_argument("--rows", type=int, default=2000, help="rows of the batch in each mix")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--deep-jobs", type=int, default=300, help="jobs queued before each worker kill")
    parser.add_argument("--lease", type=float, default=5.0, help="lease_seconds")
    parser.add_argument("--outage", type=float, default=5.0, help="seconds Redis is down")
    parser.add_argument("--databases", default="sqlite,postgresql")
    args = parser.parse_args()
    model_dir = resolve_model_dir("tiny", MODEL_CACHE, log=print)
    figures = {"lease_seconds": args.lease, "outage_seconds": args.outage}
    for database in args.databases.split(","):
        figures[database] = run_faults(database, model_dir, args)
    lost = sum(f["lost"] for database in args.databases.split(",") for f in figures[database].values())
    twice = sum(f["run_twice"] for database in args.databases.split(",") for f in figures[database].values())
    figures["lost_in_all"], figures["run_twice_in_all"] = lost, twice
    save("chaos", figures)


if __name__ == "__main__":
    main()
