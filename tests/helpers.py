"""Small tools the tests share: free ports, waiting on conditions, servers."""

import os
import random
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import jsonschema
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text

from queue_engine.db import transaction

ROOT = Path(__file__).resolve().parent.parent


#: Ports the tests give their servers: below Linux's ephemeral range (32768-60999), so a
#: port handed out here is not also handed to a socket bound to port 0 (vLLM binds some
#: while serve starts, between our choosing a port and its binding it).
TEST_PORTS = range(20000, 32000)


def free_port():
    """A port no socket on 127.0.0.1 holds now, outside the ephemeral range."""
    while True:
        port = random.choice(TEST_PORTS)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


def wait_until(predicate, timeout, message, interval=0.05):
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {message}")
        time.sleep(interval)


def race(sessions, attempts):
    """Run each ``attempt(session)`` in a transaction of its own, in threads,
    every transaction begun before any attempt runs: their results, in order."""
    barrier, results = threading.Barrier(len(attempts)), [None] * len(attempts)

    def contend(index, attempt):
        with transaction(sessions) as session:
            session.execute(text("SELECT 1"))  # the transaction has begun
            barrier.wait()
            results[index] = attempt(session)

    threads = [threading.Thread(target=contend, args=item) for item in enumerate(attempts)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return results


class RedisServer:
    """A real redis-server on a free port, owned by the test run. It keeps
    nothing on disk, so :meth:`kill` then :meth:`start` is a Redis that
    restarted empty on the same port."""

    def __init__(self, directory):
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            raise RuntimeError("redis-server is not installed; `make test` installs it (apt-get install redis-server)")
        self.directory = directory
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.start()

    def start(self):
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.directory)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_until(self.ping, 10, f"redis-server on port {self.port}")

    def kill(self):
        """SIGKILL: every message it held is gone."""
        self.process.kill()
        self.process.wait(10)

    def ping(self):
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self):
        self.process.terminate()
        self.process.wait(10)


def stop_process(process, sig=signal.SIGTERM, timeout=30):
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def queue_engine_command():
    """The ``queue-engine`` console script of the project's venv, else the one on PATH."""
    venv_script = ROOT / ".venv" / "bin" / "queue-engine"
    return str(venv_script) if venv_script.exists() else "queue-engine"


def spawn(args, env, log_path):
    """Start a ``queue-engine`` subprocess with its output in ``log_path``."""
    log = open(log_path, "ab")
    return subprocess.Popen(
        [queue_engine_command(), *args], env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
    )


class WebInProcess:
    """The web app and its dispatcher in this process, as `queue-engine serve`
    runs them in cluster mode (webhook delivery aside), on a free port."""

    def __init__(self, settings):
        from web import create_app
        from web.server import build_server
        from workers.dispatcher import start_dispatcher

        self.app = create_app(settings)
        self.sessions = self.app.extensions["qe_sessions"]
        self.dispatcher = start_dispatcher(self.app.extensions["celery"], self.sessions, settings)
        self.server = build_server(self.app, port=0)
        self.url = f"http://127.0.0.1:{self.server.effective_port}"
        threading.Thread(target=self.server.run, daemon=True).start()

    def close(self):
        self.dispatcher.stop()
        self.server.close()


def wait_until_serving(url, process, log_path, timeout):
    """Wait until a `queue-engine serve` subprocess answers ``/healthz``; fail if it exits.

    Not answering counts as not up yet, not only a refused connection:
    gunicorn's master listens before its workers have built the app."""
    import requests

    def up():
        assert process.poll() is None, f"serve exited; see {log_path}"
        try:
            return requests.get(url + "/healthz", timeout=2).ok
        except requests.RequestException:
            return False

    wait_until(up, timeout, f"`queue-engine serve` at {url} (log: {log_path})", 0.2)


def metric_value(text, name, **labels):
    """The sum of the samples called ``name`` in a Prometheus scrape ``text``
    whose labels include ``labels`` (0 when there are none)."""
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == name and labels.items() <= sample.labels.items())


def response_schema(spec, path, method, status):
    """The JSON schema the OpenAPI document gives for one response."""
    schema = spec["paths"][path][method]["responses"][str(status)]["content"]["application/json"]["schema"]
    return {**schema, "components": spec["components"]}


def assert_matches_openapi(spec, path, method, response):
    """Validate a response's status and body against the OpenAPI document."""
    body = response.json() if hasattr(response, "json") and callable(response.json) else response.get_json()
    status = response.status_code
    jsonschema.validate(body, response_schema(spec, path, method, status))
    return body
