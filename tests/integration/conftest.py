"""Real parts: a redis-server on a free port, `queue-engine worker` subprocesses
running vLLM (the CPU build) on the tiny model, the web app over real HTTP,
and PostgreSQL."""

import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from queue_engine.client import Client
from queue_engine.db import make_sessions, transaction, upgrade_database
from queue_engine.models import ApiKey
from queue_engine.settings import load_settings
from tests.conftest import make_key, new_postgres_database
from slurm.commands import Slurm
from tests.helpers import (
    ROOT,
    RedisServer,
    WebInProcess,
    free_port,
    metric_value,
    spawn,
    stop_process,
    wait_until,
    wait_until_serving,
)
from workers.engine import resolve_model_dir

MODEL_CACHE = Path(os.environ.get("QUEUE_ENGINE_TEST_CACHE", Path.home() / ".cache" / "queue-engine-tests"))
WORKER_START_TIMEOUT = 240


@pytest.fixture(scope="session")
def tiny_model_dir():
    """The tiny model, built once per machine (about a minute) and reused."""
    return resolve_model_dir("tiny", MODEL_CACHE, log=print)


class LocalSlurm:
    """A one-node SLURM cluster (4 fake GPUs) started by ``slurm/local/start.sh``."""

    START, STOP = ROOT / "slurm" / "local" / "start.sh", ROOT / "slurm" / "local" / "stop.sh"

    def __init__(self, directory, env=None):
        """``env`` goes to start.sh (QE_SLURMCTLD_PORT, QE_SLURMD_PORT)."""
        self.directory = directory
        self.env = {"SLURM_CONF": str(directory / "slurm.conf")}
        self.started = subprocess.run(["bash", self.START, directory], capture_output=True, text=True, timeout=300,
                                      env={**os.environ, **(env or {})})
        if self.started.returncode != 0:
            pytest.fail(f"slurm/local/start.sh failed:\n{self.started.stderr}")

    def client(self, env=None, timeout=30):
        """A SLURM client for this cluster; ``env`` also goes to the jobs it submits."""
        return Slurm(timeout=timeout, env={**(env or {}), **self.env})

    def squeue(self, *args):
        return subprocess.run(["squeue", "--noheader", *args], capture_output=True, text=True, check=True,
                              env={**os.environ, **self.env}).stdout

    def stop(self):
        subprocess.run(["bash", self.STOP, self.directory], capture_output=True, timeout=120)


@pytest.fixture(scope="session")
def local_slurm(tmp_path_factory):
    ports = {"QE_SLURMCTLD_PORT": str(free_port()), "QE_SLURMD_PORT": str(free_port())}
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"), env=ports)
    yield cluster
    cluster.stop()


#: A setup line that puts this test run's ``queue-engine`` first on PATH in a job.
PATH_SETUP = f"export PATH={Path(sys.executable).parent}:$PATH"


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    """A redis-server of the test module's own (no module sees another's messages)."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


class Cluster:
    """Cluster mode on one machine: web and its dispatcher in this process (as
    `queue-engine serve` runs them), workers as subprocesses."""

    def __init__(self, directory, tiny_model_dir, redis_url, database_url, config_toml="", **settings):
        """``config_toml`` adds to the configuration file: more model profiles
        (``{tiny}`` in it stands for the tiny model's directory), tables."""
        self.directory = directory
        config = directory / "queue-engine.toml"
        config.write_text(
            f'[models.tiny]\npath = "{tiny_model_dir}"\n'
            "engine_args = { max_model_len = 512, seed = 0 }\nmax_in_flight = 128\n"
            + config_toml.replace("{tiny}", str(tiny_model_dir))
        )
        self.env = {
            "QUEUE_ENGINE_CONFIG": str(config),
            "QUEUE_ENGINE_BROKER_URL": redis_url,
            "QUEUE_ENGINE_DATABASE_URL": database_url,
            "QUEUE_ENGINE_DATA_DIR": str(directory / "data"),
            **{f"QUEUE_ENGINE_{name.upper()}": str(value) for name, value in settings.items()},
        }
        self.settings = load_settings(environ=self.env)
        self.sessions = make_sessions(self.settings.sqlalchemy_url)
        self.workers = []
        self.processes = []
        self._start_web()

    def _start_web(self):
        self.web = WebInProcess(self.settings)
        self.url = self.web.url

    def start_webhook_delivery(self):
        """Start `queue-engine serve` in cluster mode on a port of its own: it
        delivers webhooks (a relay and a worker for qe.webhooks)."""
        port = free_port()
        log_path = self.directory / "serve-webhooks.log"
        process = spawn(["serve", "--port", str(port)], self.env, log_path)
        self.processes.append(process)
        self.delivery_url = f"http://127.0.0.1:{port}"
        wait_until_serving(self.delivery_url, process, log_path, 60)
        return process

    def new_client(self, operator=False):
        """A client with a new key of its own; an ``operator``'s may read ``/api/v1/models``."""
        key, owner_id = make_key(self.sessions, f"k-{secrets.token_hex(4)}")
        if operator:
            with transaction(self.sessions) as session:
                session.get(ApiKey, owner_id).is_operator = True
        return Client(self.url, key.key)

    def start_worker(self, wait=True, model="tiny"):
        """Start `queue-engine worker --model MODEL`; by default wait until it has run a job."""
        port = free_port()
        log_path = self.directory / f"worker-{len(self.workers)}.log"
        process = spawn(["worker", "--model", model, "--metrics-port", str(port)], self.env, log_path)
        worker = Worker(process, port, log_path, model)
        self.workers.append(worker)
        if wait:
            self.wait_for_worker(worker)
        return worker

    def wait_for_worker(self, worker):
        client = self.new_client()
        job = client.submit_job({"model": worker.model, "prompt": "warm up", "params": {"max_tokens": 2}})

        def done():
            assert worker.process.poll() is None, f"worker exited; see {worker.log_path}:\n{worker.log_tail()}"
            return client.get_job(job["id"])["status"] == "succeeded"

        wait_until(done, WORKER_START_TIMEOUT, f"the worker to run a first job (log: {worker.log_path})", 0.5)

    def stop(self):
        for process in [worker.process for worker in self.workers] + self.processes:
            stop_process(process)
        self.web.close()
        self.sessions.kw["bind"].dispose()


class Worker:
    def __init__(self, process, metrics_port, log_path, model):
        self.process, self.metrics_port, self.log_path, self.model = process, metrics_port, log_path, model

    def metric(self, name, **labels):
        """The sum of the worker's samples called ``name`` whose labels include ``labels``."""
        return metric_value(requests.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).text,
                            name, **labels)

    def log_tail(self, lines=40):
        return "\n".join(Path(self.log_path).read_text(errors="replace").splitlines()[-lines:])


@pytest.fixture(scope="module")
def cluster_database_url(tmp_path_factory):
    """A database of the test module's own, so no module finds another's
    leftover work (a dispatcher would send it): PostgreSQL, as a cluster
    runs; SQLite only where no PostgreSQL is reachable."""
    try:
        with new_postgres_database() as url:
            yield url
    except pytest.skip.Exception:
        url = f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'queue-engine.db'}"
        upgrade_database(url)
        yield url


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_model_dir, redis_server, cluster_database_url):
    """Web + one warm worker, shared by a test module."""
    cluster = Cluster(tmp_path_factory.mktemp("cluster"), tiny_model_dir, redis_server.url, cluster_database_url,
                      lease_seconds=3)
    cluster.start_worker()
    yield cluster
    cluster.stop()
