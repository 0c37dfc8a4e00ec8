"""Scale-out latency on a real one-node SLURM cluster, measured in one run.

`slurm/local/start.sh` starts slurmctld/slurmd (4 fake GPUs), a redis-server
and `queue-engine autoscale` run as they would in production; workers are
real `queue-engine worker` processes (vLLM, the CPU build) started by SLURM.

1. Backlog -> sbatch: one job arrives for an idle model (its workers only
   sleep, so nothing but the autoscaler is timed); from the submission to
   sbatch returning a job id. Side by side for ``interval`` 1 s and 5 s
   (the default), arrivals at random points of the interval.
2. sbatch -> first row done, split into SLURM start (sbatch to the job's
   first shell line), engine load (to the worker registering as serving) and
   first row (to the first row of a batch stored), with real workers.
3. Idle -> zero: from the batch's last row to no worker job left in squeue,
   with ``idle_grace`` 5 s (goal: idle_grace + 5 s).

Through (2) and (3) it samples a timeline every 0.5 s (``timeline``: the
backlog as the autoscaler reads it, worker jobs by allocation state, rows
done), which ``bench/report.py`` plots.

Prints the figures as one JSON object on its last line.

    python bench/scale_out.py [--rounds 10] [--batches 2] [--rows 600] [--database-url ...]
"""

import argparse
import io
import os
import random
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402
from sqlalchemy import func, select  # noqa: E402

from bench.batches import percentile  # noqa: E402
from bench.results import save  # noqa: E402
from queue_engine.apikeys import create_api_key  # noqa: E402
from queue_engine.client import Client  # noqa: E402
from queue_engine.db import make_sessions, transaction, upgrade_database  # noqa: E402
from queue_engine.load import read_backlog  # noqa: E402
from queue_engine.models import Job, WorkerAllocation  # noqa: E402
from queue_engine.settings import load_settings  # noqa: E402
from slurm.commands import Slurm  # noqa: E402
from slurm.jobscript import job_name  # noqa: E402
from tests.helpers import RedisServer, WebInProcess, free_port, spawn, stop_process, wait_until  # noqa: E402
from tests.integration.conftest import MODEL_CACHE  # noqa: E402
from workers.engine import resolve_model_dir  # noqa: E402

IDLE_GRACE = 5
#: Seconds between two points of the timeline of (2) and (3).
TIMELINE_STEP = 0.5
#: A setup line that stamps the moment the job's shell starts into its output.
STAMP = 'echo "qe-bench-started $(date +%s.%N)"'


class Deployment:
    """Web in this process, `queue-engine autoscale` as a subprocess, one config."""

    def __init__(self, tmp, name, slurm_env, redis_url, database_url, model_dir, interval, slurm_toml):
        self.dir = tmp / name
        self.dir.mkdir()
        config = self.dir / "queue-engine.toml"
        config.write_text(
            f'[autoscaler]\ndeployment = "{name}"\ninterval = {interval}\nidle_grace = {IDLE_GRACE}\n'
            f'[models.tiny]\npath = "{model_dir}"\nengine_args = {{ max_model_len = 512, seed = 0 }}\n'
            f"max_in_flight = 128\n[models.tiny.slurm]\n{slurm_toml}")
        self.env = {"QUEUE_ENGINE_CONFIG": str(config), "QUEUE_ENGINE_BROKER_URL": redis_url,
                    "QUEUE_ENGINE_DATABASE_URL": database_url, "QUEUE_ENGINE_DATA_DIR": str(self.dir / "data"),
                    **slurm_env}
        self.settings = load_settings(environ=self.env)
        self.sessions = make_sessions(database_url)
        self.slurm = Slurm(env=slurm_env)
        self.name = job_name(name, "tiny")
        self.deployment = name
        self.web = WebInProcess(self.settings)
        with transaction(self.sessions) as session:
            key = create_api_key(session, f"bench-{name}-{secrets.token_hex(3)}").key
        self.client = Client(self.web.url, key, timeout=600)
        self.autoscaler = spawn(["autoscale"], self.env, self.dir / "autoscale.log")

    def allocations(self):
        with self.sessions() as session:
            return list(session.scalars(select(WorkerAllocation).where(
                WorkerAllocation.deployment == self.deployment).order_by(WorkerAllocation.id)))

    def jobs(self):
        return self.slurm.jobs([self.name])

    def stop(self):
        stop_process(self.autoscaler)
        self.slurm.cancel([job.job_id for job in self.jobs()])
        self.web.close()


def backlog_to_sbatch(deployment, broker, rounds, interval):
    """Seconds from a job's submission to sbatch returning, ``rounds`` times."""
    latencies = []
    for number in range(rounds):
        time.sleep(random.uniform(0, interval))  # arrive at a random point of the autoscaler's interval
        known = len(deployment.allocations())
        submitted = time.time()
        job = deployment.client.submit_job({"model": "tiny", "prompt": f"probe {number}"})
        allocation = wait_until(lambda: deployment.allocations()[known:], 30, "an sbatch", 0.005)[0]
        latencies.append(allocation.submitted_at.timestamp() - submitted)
        deployment.client.cancel_job(job["id"])
        broker.delete("qe.tiny.interactive")  # the cancelled job's message: the backlog is zero again
        wait_until(lambda: not deployment.jobs() and all(a.ended_at for a in deployment.allocations()),
                   IDLE_GRACE + 30, "the sleeping worker job to be stopped", 0.1)
    return latencies


def started_at(deployment, allocation):
    out = deployment.dir / "data" / "slurm" / f"{deployment.name}-{allocation.slurm_job_id}.out"
    for line in out.read_text().splitlines():
        if line.startswith("qe-bench-started "):
            return float(line.split()[1])
    raise RuntimeError(f"no start stamp in {out}")


def batch_round(deployment, rows):
    """One batch of ``rows`` on a model with no workers: the start split and idle -> zero."""
    known = len(deployment.allocations())
    csv = io.BytesIO(("id,prompt\n" + "".join(f"{n},Tell me about {n}\n" for n in range(rows))).encode())
    submitted = time.time()
    batch = deployment.client.submit_batch(csv, "tiny", filename="rows.csv", params={"max_tokens": 16})
    done = deployment.client.wait_for_batch(batch["id"], timeout=900, interval=0.2)
    assert done["request_counts"]["completed"] == rows, done
    wait_until(lambda: not deployment.jobs(), IDLE_GRACE + 120, "no worker job left", 0.05)
    zero = time.time()
    with deployment.sessions() as session:
        first_row, last_row = session.execute(select(func.min(Job.finished_at), func.max(Job.finished_at))
                                              .where(Job.batch_id == batch["id"])).one()
    ours = deployment.allocations()[known:]
    first = min(ours, key=lambda a: a.serving_at)
    sbatch, start = first.submitted_at.timestamp(), started_at(deployment, first)
    serving = first.serving_at.timestamp()
    return {
        "workers": len(ours),
        "backlog_to_sbatch_s": sbatch - submitted,
        "slurm_start_s": start - sbatch,
        "engine_load_s": serving - start,
        "first_row_s": first_row.timestamp() - serving,
        "sbatch_to_first_row_s": first_row.timestamp() - sbatch,
        "batch_s": last_row.timestamp() - submitted,
        "idle_to_zero_s": zero - last_row.timestamp(),
    }


def timeline_point(session, deployment, since):
    """The backlog of model ``tiny`` (as the autoscaler reads it), ``deployment``'s
    live worker jobs by allocation state, and batch rows finished since ``since``."""
    workers = dict(session.execute(
        select(WorkerAllocation.state, func.count())
        .where(WorkerAllocation.deployment == deployment, WorkerAllocation.ended_at.is_(None))
        .group_by(WorkerAllocation.state)).all())
    rows_done = session.scalar(select(func.count()).select_from(Job).where(
        Job.model == "tiny", Job.batch_id.is_not(None), Job.status == "succeeded", Job.finished_at >= since))
    return {"backlog": read_backlog(session, ["tiny"])["backlog"], "workers": workers, "rows_done": rows_done}


def record_timeline(deployment, stop, points):
    """Append a timeline point (``t_s`` from now on) to ``points`` every
    TIMELINE_STEP s until ``stop`` is set; run it in a thread."""
    since, started = datetime.now(timezone.utc), time.monotonic()
    while not stop.wait(TIMELINE_STEP):
        with deployment.sessions() as session:
            point = timeline_point(session, deployment.deployment, since)
        points.append({"t_s": round(time.monotonic() - started, 2), **point})


def summary(values):
    return {"p50": round(statistics.median(values), 3), "p95": round(percentile(values, 95), 3),
            "max": round(max(values), 3)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10, help="arrivals per interval in (1)")
    parser.add_argument("--batches", type=int, default=2, help="batches in (2) and (3), one after another")
    parser.add_argument("--rows", type=int, default=600)
    parser.add_argument("--database-url", default=None, help="default: a SQLite file in a temporary directory")
    args = parser.parse_args()

    model_dir = resolve_model_dir("tiny", MODEL_CACHE, log=print)
    with tempfile.TemporaryDirectory(prefix="qe-bench-scale-") as tmp:
        tmp = Path(tmp)
        ports = {"QE_SLURMCTLD_PORT": str(free_port()), "QE_SLURMD_PORT": str(free_port())}
        subprocess.run(["bash", ROOT / "slurm" / "local" / "start.sh", tmp / "slurm"], check=True,
                       env={**os.environ, **ports}, stdout=subprocess.DEVNULL)
        slurm_env = {"SLURM_CONF": str(tmp / "slurm" / "slurm.conf")}
        redis_server = RedisServer(tmp)
        database_url = args.database_url or f"sqlite:///{tmp / 'bench.db'}"
        upgrade_database(database_url)
        broker = redis.Redis.from_url(redis_server.url)
        sleeper = 'gpus = 1\ncpus = 1\nmem = "100M"\nmax_workers = 1\ntarget_backlog_per_worker = 1\nsetup = ["sleep 600"]\n'
        worker = (f'gpus = 1\ncpus = 2\nmem = "3G"\nmax_workers = 2\ntarget_backlog_per_worker = 64\n'
                  f"setup = ['{STAMP}', 'export PATH={Path(sys.executable).parent}:$PATH']\n")
        figures = {"database": database_url.split(":")[0], "idle_grace_s": IDLE_GRACE, "batches": args.batches,
                   "rows": args.rows}
        run = secrets.token_hex(2)  # deployments of their own, should the database be shared with earlier runs
        deployments = []
        try:
            for interval in (1, 5):
                print(f"(1) backlog -> sbatch, interval {interval} s, {args.rounds} arrivals ...", flush=True)
                deployment = Deployment(tmp, f"probe{interval}-{run}", slurm_env, redis_server.url, database_url,
                                        model_dir, interval, sleeper)
                deployments.append(deployment)
                figures[f"backlog_to_sbatch_interval_{interval}s"] = summary(
                    backlog_to_sbatch(deployment, broker, args.rounds, interval))
                deployment.stop()
            print(f"(2, 3) {args.batches} batches of {args.rows} rows on a model with no workers ...", flush=True)
            deployment = Deployment(tmp, f"workers-{run}", slurm_env, redis_server.url, database_url, model_dir, 1, worker)
            deployments.append(deployment)
            stop, timeline = threading.Event(), []
            sampler = threading.Thread(target=record_timeline, args=(deployment, stop, timeline), daemon=True)
            sampler.start()
            try:
                rounds = [batch_round(deployment, args.rows) for _ in range(args.batches)]
            finally:
                stop.set()
                sampler.join()
            for name in rounds[0]:
                figures[name] = [round(r[name], 2) for r in rounds]
            figures["idle_to_zero_vs_goal"] = round(max(figures["idle_to_zero_s"]) / (IDLE_GRACE + 5), 2)
            figures["backlog_to_sbatch_vs_goal"] = round(figures["backlog_to_sbatch_interval_1s"]["max"] / 2, 2)
            figures["timeline"] = timeline
        finally:
            for deployment in deployments:
                deployment.stop()
            redis_server.stop()
            subprocess.run(["bash", ROOT / "slurm" / "local" / "stop.sh", tmp / "slurm"], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    save("scale_out", figures)


if __name__ == "__main__":
    main()
