"""A fault rig, for tests/integration/test_chaos.py and bench/chaos.py.

queue-engine in cluster mode, built from real parts the rig owns: a
redis-server (killed and restarted empty at will), the database (a SQLite
file, or a PostgreSQL cluster of its own that can be restarted), `queue-engine
serve` and `queue-engine worker` processes (vLLM on the tiny model), and a
webhook receiver that verifies signatures.

Each fault function submits a mix of work (single jobs, a tribunal, a batch,
jobs with webhooks), injects its fault while that work is in flight, waits
for everything to end, and returns the figures of issue 13: how many items
were accepted and ended, how many were lost (never ended) or run twice (a
generation finished by an engine but not stored as that engine's result),
and how long after the fault's end the last item ended.
"""

import io
import signal
import time
from pathlib import Path
from typing import NamedTuple

import requests
from sqlalchemy import func, select

from queue_engine.apikeys import create_api_key
from queue_engine.client import Client
from queue_engine.db import make_sessions, transaction, upgrade_database
from queue_engine.models import Batch, Job, WebhookEvent
from tests.helpers import free_port, metric_value, spawn, stop_process, wait_until, wait_until_serving
from tests.receiver import Receiver

WORKER_START_TIMEOUT = 240
JOB_ENDS = ("succeeded", "failed", "cancelled")
BATCH_ENDS = ("completed", "failed", "cancelled")


class Work(NamedTuple):
    """What one fault's submissions created."""

    jobs: list  # ids of single jobs and tribunals
    batches: list  # ids
    rows: int  # batch rows in all
    hooked: list  # ids of the jobs that have a webhook_url
    submitted_at: float = 0.0  # unix time of the first submission

    @property
    def accepted(self):
        return len(self.jobs) + self.rows


class Process(NamedTuple):
    process: object
    log_path: Path
    metrics_port: int | None = None

    @property
    def pid(self):
        return self.process.pid

    def serving(self):
        """Whether a worker has loaded its engine and takes messages (Celery says it is ready)."""
        assert self.process.poll() is None, f"the process exited; see {self.log_path}"
        return b" ready." in self.log_path.read_bytes()

    def finished(self):
        """The engine's finished generations (a worker's Prometheus counter)."""
        text = requests.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).text
        return metric_value(text, "qe_engine_requests_total", outcome="finished")


class Rig:
    """Cluster mode on one machine, every part owned and breakable.

    Args:
        directory: where config, data and logs go.
        model_dir: the tiny model.
        database_url: SQLite file or the rig's own PostgreSQL.
        redis: a :class:`tests.helpers.RedisServer`.
        settings: more ``QUEUE_ENGINE_*`` settings (e.g. ``lease_seconds=3``).
    """

    def __init__(self, directory, model_dir, database_url, redis, **settings):
        self.directory = Path(directory)
        self.redis = redis
        config = self.directory / "queue-engine.toml"
        config.write_text(
            f'[models.tiny]\npath = "{model_dir}"\n'
            "engine_args = { max_model_len = 512, seed = 0 }\nmax_in_flight = 64\n"
            "[dispatcher]\ncheck_interval = 1.0\n"
        )
        self.env = {
            "QUEUE_ENGINE_CONFIG": str(config),
            "QUEUE_ENGINE_BROKER_URL": redis.url,
            "QUEUE_ENGINE_DATABASE_URL": database_url,
            "QUEUE_ENGINE_DATA_DIR": str(self.directory / "data"),
            "QUEUE_ENGINE_WEBHOOK_ALLOW": "127.0.0.1/32",
            "QUEUE_ENGINE_WEBHOOK_RETRY_DELAYS": "1,1,2,2,4,4,8,8,16",
            **{f"QUEUE_ENGINE_{name.upper()}": str(value) for name, value in settings.items()},
        }
        upgrade_database(database_url)
        self.sessions = make_sessions(database_url)
        with transaction(self.sessions) as session:
            key = create_api_key(session, f"chaos-{time.time_ns()}")
        self.key = key.key
        self.receiver = Receiver(secrets=[key.webhook_secret])
        self.serve = None
        self.url = None
        self.workers = []

    # --- processes -----------------------------------------------------------------

    def start_serve(self, faults=""):
        port = free_port()
        log_path = self.directory / f"serve-{port}.log"
        env = {**self.env, "QUEUE_ENGINE_FAULTS": faults}
        self.serve = Process(spawn(["serve", "--port", str(port)], env, log_path), log_path)
        self.url = f"http://127.0.0.1:{port}"
        wait_until_serving(self.url, self.serve.process, log_path, 60)
        return self.serve

    def stop_serve(self):
        stop_process(self.serve.process)

    def client(self):
        return Client(self.url, self.key)

    def start_worker(self, faults="", warm=True):
        """Start `queue-engine worker --model tiny`; with ``warm``, wait until it has run a job."""
        port = free_port()
        log_path = self.directory / f"worker-{port}.log"
        env = {**self.env, "QUEUE_ENGINE_FAULTS": faults}
        worker = Process(spawn(["worker", "--model", "tiny", "--metrics-port", str(port)], env, log_path),
                         log_path, port)
        self.workers.append(worker)
        if warm:
            client = self.client()
            job = client.submit_job({"model": "tiny", "prompt": "warm up", "params": {"max_tokens": 2}})

            def warmed():
                assert worker.process.poll() is None, f"the worker exited; see {log_path}"
                return client.get_job(job["id"])["status"] == "succeeded"

            wait_until(warmed, WORKER_START_TIMEOUT, f"a worker to run its first job (log: {log_path})", 0.5)
        return worker

    def kill_worker(self, worker):
        worker.process.send_signal(signal.SIGKILL)
        worker.process.wait(10)
        self.workers.remove(worker)

    def close(self):
        for worker in self.workers:
            stop_process(worker.process)
        if self.serve is not None:
            stop_process(self.serve.process)
        self.receiver.stop()
        self.sessions.kw["bind"].dispose()

    # --- work ----------------------------------------------------------------------

    def submit_mix(self, jobs=12, rows=200, max_tokens=200, tribunal=True, client=None):
        """Single jobs (a third with a webhook), a tribunal and a batch."""
        client = client or self.client()
        submitted_at = time.time()
        params = {"max_tokens": max_tokens, "temperature": 0}
        ids, hooked = [], []
        for number in range(jobs):
            body = {"model": "tiny", "prompt": f"Tell me about item {number}", "params": params}
            if number % 3 == 0:
                body["webhook_url"] = self.receiver.url
            job = client.submit_job(body)
            ids.append(job["id"])
            if "webhook_url" in body:
                hooked.append(job["id"])
        if tribunal:
            ids.append(client.submit_tribunal({
                "prompt": "What does list.append return?", "candidates": ["tiny", "tiny"], "judge": "tiny",
                "bypass": "never", "params": {"max_tokens": 24}})["id"])
        batches = []
        if rows:
            data = io.BytesIO(("prompt\n" + "".join(f"Row {n} of the chaos batch\n" for n in range(rows))).encode())
            batches.append(client.submit_batch(data, "tiny", filename="chaos.csv", params=params)["id"])
        return Work(ids, batches, rows, hooked, submitted_at)

    def ended(self, work):
        """How many of ``work``'s jobs and batch rows have ended."""
        with self.sessions() as session:
            jobs = session.scalar(select(func.count()).select_from(Job)
                                  .where(Job.id.in_(work.jobs), Job.status.in_(JOB_ENDS))) if work.jobs else 0
            rows = session.scalar(select(func.count()).select_from(Job)
                                  .where(Job.batch_id.in_(work.batches), Job.status.in_(JOB_ENDS))) if work.batches else 0
        return jobs + rows

    def wait_running(self, work, rows_done=1):
        """Wait until some of the work runs and some batch rows are done: the fault hits work in flight."""
        def in_flight():
            with self.sessions() as session:
                running = session.scalar(select(func.count()).select_from(Job).where(Job.status == "running"))
                done = session.scalar(select(func.coalesce(func.sum(Batch.completed), 0))
                                      .where(Batch.id.in_(work.batches))) if work.batches else rows_done
            return running > 0 and done >= rows_done

        wait_until(in_flight, 120, "work to be running", 0.05)

    def wait_ended(self, work, timeout):
        """Wait (up to ``timeout`` s) for every item and every webhook event of ``work``
        to end; returns how many items never did (0 is the promise)."""
        def done():
            return self.ended(work) == work.accepted and self.delivered(work) == len(work.hooked)

        try:
            wait_until(done, timeout, "every accepted item to end", 0.2)
        except AssertionError:
            pass
        return work.accepted - self.ended(work)

    def delivered(self, work):
        """The hooked jobs whose event the receiver accepted."""
        with self.sessions() as session:
            event_ids = set(session.scalars(select(WebhookEvent.id).where(WebhookEvent.job_id.in_(work.hooked))))
        return len(event_ids & {d.webhook_id for d in self.receiver.accepted()})

    def last_end(self, work):
        """When the last of ``work``'s items ended (a unix time)."""
        with self.sessions() as session:
            ends = [session.scalar(select(func.max(Job.finished_at)).where(Job.id.in_(work.jobs)))]
            if work.batches:
                ends.append(session.scalar(select(func.max(Batch.completed_at)).where(Batch.id.in_(work.batches))))
        return max(end.timestamp() for end in ends if end is not None)

    def run_twice(self):
        """Generations the live workers' engines finished beyond the results
        stored as theirs: work that ran to the end twice. (A killed worker's
        engine can finish nothing after its death.)"""
        extra = 0
        with self.sessions() as session:
            for worker in self.workers:
                stored = session.scalar(select(func.count()).select_from(Job).where(
                    Job.status == "succeeded", Job.lease_owner.like(f"%:{worker.pid}:%")))
                extra += worker.finished() - stored
        return int(extra)

    def figures(self, work, lost, fault_end):
        """The figures of one fault (issue 13): accepted, ended, lost, run twice, seconds to the last end."""
        return {
            "accepted": work.accepted,
            "ended": self.ended(work),
            "lost": lost,
            "run_twice": self.run_twice(),
            "webhook_events": len(work.hooked),
            "webhook_events_delivered": self.delivered(work),
            "seconds_to_last_end": round(max(0.0, self.last_end(work) - fault_end), 2),
            "seconds_from_submission_to_last_end": round(self.last_end(work) - work.submitted_at, 2),
        }


# --- the faults --------------------------------------------------------------------------


def no_fault(rig, timeout=180, **mix):
    """The same mix with nothing broken: what the faults' times compare with."""
    work = rig.submit_mix(**mix)
    return rig.figures(work, rig.wait_ended(work, timeout), work.submitted_at)


def redis_restarted_empty(rig, outage=2.0, timeout=180, **mix):
    """Redis SIGKILLed while work runs, and back empty ``outage`` seconds later."""
    work = rig.submit_mix(**mix)
    rig.wait_running(work)
    rig.redis.kill()
    time.sleep(outage)  # the outage itself, not a wait for anything
    rig.redis.start()
    fault_end = time.time()
    return rig.figures(work, rig.wait_ended(work, timeout), fault_end)


def redis_down_while_submitting(rig, outage=5.0, timeout=180, **mix):
    """Redis down; work submitted meanwhile is accepted (202) and runs once Redis is back."""
    rig.redis.kill()
    started = time.monotonic()
    work = rig.submit_mix(**mix)
    ready = requests.get(rig.url + "/readyz", timeout=10)
    time.sleep(max(0.0, outage - (time.monotonic() - started)))  # the rest of the outage
    rig.redis.start()
    fault_end = time.time()
    figures = rig.figures(work, rig.wait_ended(work, timeout), fault_end)
    return {**figures, "readyz_while_down": [ready.status_code, ready.json()["status"]]}


def postgres_restarted(rig, postgres, outage=5.0, timeout=180, **mix):
    """PostgreSQL stopped (every connection closed) while work runs, and started
    ``outage`` seconds later: longer than a lease, so workers must renew and
    store what they finished meanwhile before the dispatcher judges them dead."""
    work = rig.submit_mix(**mix)
    rig.wait_running(work)
    postgres.stop("fast")
    time.sleep(outage)  # the outage itself
    postgres.start()
    fault_end = time.time()
    return rig.figures(work, rig.wait_ended(work, timeout), fault_end)


def worker_killed_while_taking(rig, kills=2, jobs=150, timeout=240):
    """A worker SIGKILLed ``kills`` times while it takes messages from a deep
    queue (beside the rig's long-lived worker), each time a new one. Returns the
    figures and, per kill, the seconds until no job was still running under the
    dead worker's lease (each was back in the queue, and the live worker takes
    it from there)."""
    client = rig.client()
    params = {"max_tokens": 48, "temperature": 0}
    ids, recoveries = [], []
    for round_number in range(kills):
        victim = rig.start_worker(warm=False)
        wait_until(lambda: victim.serving(), WORKER_START_TIMEOUT, f"a worker to serve (log: {victim.log_path})")
        ids += [client.submit_job({"model": "tiny", "prompt": f"Deep queue {round_number}.{n}", "params": params})["id"]
                for n in range(jobs)]
        wait_until(lambda: held_by(rig, victim.pid), 60, "the new worker to take jobs", 0.01)
        rig.kill_worker(victim)
        killed_at = time.monotonic()
        wait_until(lambda: not held_by(rig, victim.pid), timeout, "the dead worker's jobs to be requeued", 0.1)
        recoveries.append(round(time.monotonic() - killed_at, 2))
    fault_end = time.time()
    work = Work(ids, [], 0, [], fault_end)
    figures = rig.figures(work, rig.wait_ended(work, timeout), fault_end)
    return {**figures, "seconds_to_recover_each_kill": recoveries}


def held_by(rig, pid):
    """How many jobs a worker process holds running."""
    with rig.sessions() as session:
        return session.scalar(select(func.count()).select_from(Job).where(
            Job.status == "running", Job.lease_owner.like(f"%:{pid}:%")))


def killed_between_commit_and_send(rig, timeout=180):
    """`serve` dies right after committing a job, then a batch, before sending
    them (fault point ``after_commit``); a worker dies right after committing a
    tribunal's next step. The client retries the job with its Idempotency-Key
    once `serve` is back; nothing sends the stored messages but the dispatcher."""
    rig.stop_serve()
    outcomes = []
    for submit in (lambda c: c.submit_job({"model": "tiny", "prompt": "crash after commit"}, "crash-1"),
                   lambda c: c.submit_batch(io.BytesIO(b"prompt\none\ntwo\nthree\n"), "tiny", filename="c.csv")):
        rig.start_serve(faults="after_commit")
        try:
            submit(rig.client())
            outcomes.append("answered")
        except requests.ConnectionError:
            outcomes.append("died")
        rig.serve.process.wait(30)
    rig.start_serve()
    client = rig.client()
    job = client.submit_job({"model": "tiny", "prompt": "crash after commit"}, "crash-1")  # the client's retry
    with rig.sessions() as session:
        batch_ids = list(session.scalars(select(Batch.id).where(Batch.filename == "c.csv")))
    # A worker that dies between committing a tribunal step and sending the next one.
    for worker in list(rig.workers):
        rig.kill_worker(worker)
    crashing = rig.start_worker(faults="after_commit", warm=False)
    tribunal = client.submit_tribunal({"prompt": "Crash me", "candidates": ["tiny"], "judge": "tiny",
                                       "bypass": "never", "params": {"max_tokens": 8}})
    crashing.process.wait(WORKER_START_TIMEOUT)
    rig.workers.remove(crashing)
    rig.start_worker(warm=False)
    fault_end = time.time()
    work = Work([job["id"], tribunal["id"]], batch_ids, 3 * len(batch_ids), [], fault_end)
    figures = rig.figures(work, rig.wait_ended(work, timeout), fault_end)
    return {**figures, "serve_at_fault": outcomes, "worker_exit_at_fault": crashing.process.returncode}
