"""How fast the dashboard's pages render on a full database.

Seeds a PostgreSQL database of its own (on the server of
``QUEUE_ENGINE_TEST_POSTGRES``, default 127.0.0.1:5432, trust auth) with
1,000 batches and 100,000 jobs spread over a week and five keys: batch rows
(most of the jobs), single jobs and tribunals with their steps; 20
batches still running, whose finished rows (about a thousand) ended in the
last minutes (the tokens/s chart). One key ran batches only, so its few single jobs lie under
tens of thousands of newer batch rows: the worst case for its job list.

Then renders each page through the Flask app (test client, signed in by the
dashboard's cookie, the whole response read) for an operator key and
ordinary ones: the overview, a batch's page, a tribunal's page. Prints p50 and max per page and one JSON
object on its last line. The database is dropped at the end.

    python bench/dashboard.py [--jobs 100000] [--batches 1000] [--repeat 30]
"""

import argparse
import os
import random
import re
import secrets
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psycopg  # noqa: E402
from sqlalchemy import func, insert, select  # noqa: E402

from bench.results import save  # noqa: E402
from queue_engine.apikeys import create_api_key  # noqa: E402
from queue_engine.db import transaction, upgrade_database  # noqa: E402
from queue_engine.models import ApiKey, Batch, Job, utcnow  # noqa: E402
from queue_engine.settings import load_settings  # noqa: E402
from web import create_app  # noqa: E402

ADMIN_URL = os.environ.get("QUEUE_ENGINE_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
KEYS = ("ops", "alice", "bob", "carol", "batches-only")
WEEK = 7 * 24 * 3600
#: Rows written per INSERT.
INSERT_ROWS = 5000


def stamp_id(prefix, moment):
    """An id as ``models.new_id`` makes it at ``moment``: ids sort by creation time."""
    return f"{prefix}_{int(moment.timestamp() * 1000):012x}{secrets.token_hex(6)}"


def job_values(owner_id, created, finished=True, **fields):
    """One jobs-table row, finished a few seconds after ``created`` unless not ``finished``."""
    done = created + timedelta(seconds=random.uniform(0.5, 20))
    values = {
        "id": stamp_id("job", created), "owner_id": owner_id, "kind": "single", "model": "tiny", "lane": "interactive",
        "status": "succeeded" if finished else "queued", "prompt": f"Question at {created:%H:%M:%S}",
        "params": {"max_tokens": 64}, "attempts": 1 if finished else 0, "created_at": created,
        "started_at": created if finished else None, "finished_at": done if finished else None,
        "prompt_tokens": 12 if finished else None, "completion_tokens": random.randint(8, 64) if finished else None,
        "result_text": "An answer." if finished else None, "finish_reason": "stop" if finished else None,
        "batch_id": None, "row_index": None, "custom_id": None, "chunk": None, "parent_id": None, "step": None,
        "tribunal": None, "dispatched_at": created,
    }
    values.update(fields)
    return values


def seed(sessions, total_jobs, total_batches):
    """Write the keys, batches and jobs; returns ``{key name: key in clear}`` and a sample of ids."""
    now = utcnow()
    with transaction(sessions) as session:
        keys = {name: create_api_key(session, name, is_operator=name == "ops").key for name in KEYS}
        owners = dict(session.execute(select(ApiKey.name, ApiKey.id)).all())
    random.seed(18)
    tribunals = total_jobs // 100  # each with four steps: two candidates, a critique, a revision
    singles = total_jobs * 15 // 100
    rows_total = total_jobs - singles - tribunals * 5 - 5
    jobs, batches = [], []
    # Batches: spread over the week, 20 still running; "batches-only" has the newest 40 %.
    sizes = [max(1, int(random.expovariate(1 / (rows_total / total_batches)))) for _ in range(total_batches)]
    scale = rows_total / sum(sizes)
    sizes = [max(1, int(size * scale)) for size in sizes]
    sizes[-1] += rows_total - sum(sizes)
    for number, size in enumerate(sizes):
        newest = number >= total_batches * 0.6
        owner = owners["batches-only"] if newest else owners[random.choice(("alice", "bob", "carol"))]
        created = now - timedelta(seconds=WEEK * (1 - number / total_batches) + 60)
        running = number >= total_batches - 20
        finished_rows = size // 2 if running else size
        batch_id = stamp_id("batch", created)
        batches.append({
            "id": batch_id, "owner_id": owner, "model": "tiny", "status": "in_progress" if running else "completed",
            "input_format": "csv", "filename": f"file-{number}.csv", "id_column": "id", "params": {"max_tokens": 64},
            "total": size, "completed": finished_rows, "failed": 0, "cancelled": 0, "chunks": size // 256 + 1,
            "created_at": created, "completed_at": None if running else created + timedelta(seconds=300),
        })
        for row in range(size):
            done = row < finished_rows
            # Running batches' rows finished within the last minutes: the chart has data.
            row_created = now - timedelta(seconds=random.uniform(5, 800)) if running else created
            jobs.append(job_values(owner, row_created, done, kind="batch_item", lane="bulk", batch_id=batch_id,
                                   row_index=row, custom_id=str(row), chunk=row // 256))
    people = [owners[name] for name in ("ops", "alice", "bob", "carol")]
    for _ in range(singles):
        created = now - timedelta(seconds=random.uniform(0, WEEK))
        jobs.append(job_values(random.choice(people), created, created < now - timedelta(seconds=30)))
    for number in range(5):  # the batch-only key's few single jobs, a week old
        jobs.append(job_values(owners["batches-only"], now - timedelta(seconds=WEEK - number)))
    for _ in range(tribunals):
        created = now - timedelta(seconds=random.uniform(0, WEEK))
        jobs.extend(tribunal_values(random.choice(people), created))
    with transaction(sessions) as session:
        for start in range(0, len(batches), INSERT_ROWS):
            session.execute(insert(Batch), batches[start:start + INSERT_ROWS])
        for start in range(0, len(jobs), INSERT_ROWS):
            session.execute(insert(Job), jobs[start:start + INSERT_ROWS])
    big = max(batches, key=lambda b: b["total"] if b["status"] == "in_progress" else 0)
    tribunal = next(j for j in reversed(jobs) if j["kind"] == "tribunal" and j["owner_id"] == owners["alice"])
    return keys, {"batch": big["id"], "tribunal": tribunal["id"], "jobs": len(jobs), "batches": len(batches)}


def tribunal_values(owner_id, created):
    """A finished tribunal and its five steps."""
    parent = job_values(owner_id, created, kind="tribunal", prompt="What is a list?")
    candidates = [{"model": "tiny", "seed": seed, "text": f"Candidate {seed}."} for seed in (1, 2)]
    parent["tribunal"] = {"bypass": "never", "bypassed": False, "reason": None, "readings": None,
                          "candidates": candidates, "judge": "tiny", "reviser": "tiny",
                          "critique": "The first is better.", "final": "A list is ordered."}
    steps = [job_values(owner_id, created, kind="tribunal_step", parent_id=parent["id"], step=step, row_index=index)
             for index, step in enumerate(("candidate", "candidate", "critique", "revision"))]
    return [parent, *steps]


def signed_in_client(app, key):
    client = app.test_client()
    token = re.search(r'name="csrf_token" value="([^"]+)"', client.get("/dashboard/sign-in").text).group(1)
    response = client.post("/dashboard/sign-in", data={"key": key, "csrf_token": token})
    assert response.status_code == 302, response.text[:300]
    return client


def time_page(client, path, repeat):
    """Milliseconds of each of ``repeat`` renders of ``path`` (after one warm-up)."""
    assert client.get(path).status_code == 200, path
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        response = client.get(path)
        response.get_data()
        times.append((time.perf_counter() - started) * 1000)
        assert response.status_code == 200, path
    return times


def new_database():
    admin = ADMIN_URL.replace("postgresql+psycopg://", "postgresql://")
    name = f"qe_bench_dashboard_{secrets.token_hex(4)}"
    with psycopg.connect(admin, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    return admin, name, ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--batches", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=30, help="renders of each page")
    args = parser.parse_args()
    admin, name, url = new_database()
    try:
        upgrade_database(url)
        settings = load_settings(environ={}, data_dir=tempfile.mkdtemp(prefix="qe-bench-dashboard-"),
                                 database_url=url, broker_url="redis://127.0.0.1:1/0")
        app = create_app(settings)
        started = time.monotonic()
        keys, ids = seed(app.extensions["qe_sessions"], args.jobs, args.batches)
        with psycopg.connect(admin.rsplit("/", 1)[0] + f"/{name}", autocommit=True) as connection:
            connection.execute("VACUUM ANALYZE")
            size = connection.execute("SELECT pg_size_pretty(pg_database_size(current_database()))").fetchone()[0]
        with app.extensions["qe_sessions"]() as session:
            counted = (session.scalar(select(func.count()).select_from(Job)),
                       session.scalar(select(func.count()).select_from(Batch)))
        print(f"seeded {counted[0]} jobs and {counted[1]} batches ({size}) in {time.monotonic() - started:.0f} s",
              flush=True)
        pages = {
            "overview (operator)": ("ops", "/dashboard"),
            "overview (alice)": ("alice", "/dashboard"),
            "overview (batches-only key)": ("batches-only", "/dashboard"),
            "batch page (operator)": ("ops", f"/dashboard/batches/{ids['batch']}"),
            "batch page (owner)": ("batches-only", f"/dashboard/batches/{ids['batch']}"),
            "tribunal page (alice)": ("alice", f"/dashboard/jobs/{ids['tribunal']}"),
        }
        figures = {"jobs": counted[0], "batches": counted[1], "database_size": size, "pages": {}}
        for label, (key_name, path) in pages.items():
            times = time_page(signed_in_client(app, keys[key_name]), path, args.repeat)
            figures["pages"][label] = {"p50_ms": round(statistics.median(times), 1), "max_ms": round(max(times), 1)}
            print(f"{label:30} p50 {statistics.median(times):7.1f} ms   max {max(times):7.1f} ms", flush=True)
        figures["slowest_p50_ms"] = max(page["p50_ms"] for page in figures["pages"].values())
        app.extensions["qe_db_engine"].dispose()
        save("dashboard", figures)
    finally:
        with psycopg.connect(admin, autocommit=True) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


if __name__ == "__main__":
    main()
