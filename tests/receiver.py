"""A real webhook receiver on loopback, for the tests and the benchmark.

It verifies every request with the ``standardwebhooks`` library (the
reference a user's receiver would use), records what arrived, and answers
with a scripted status: ``script([500, 500])`` fails twice, then 2xx again.
``stop()`` and ``start()`` take it down and bring it back on the same port.
"""

import json
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import NamedTuple

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from tests.helpers import free_port


class Delivery(NamedTuple):
    """One request that reached the receiver."""

    webhook_id: str
    headers: dict
    body: dict | None
    verified_by: list  # the secrets (by index) whose signature checked out
    status: int  # what the receiver answered
    at: float  # time.monotonic()
    wall: float  # time.time(), to compare with the times the API reports


class Receiver:
    def __init__(self, secrets=(), port=None):
        self.secrets = list(secrets)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}/hook"
        self.deliveries = []
        self._script = deque()
        self._lock = threading.Lock()
        self._server = None
        self.start()

    def script(self, answers):
        """Answer the next requests with ``answers``: a status, or ``(status, headers)``."""
        with self._lock:
            self._script.extend(answers)

    def start(self):
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                receiver._handle(self)

            def log_message(self, *args):
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self):
        """Close the port: the next attempts get "connection refused"."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def _handle(self, request):
        raw = request.rfile.read(int(request.headers.get("Content-Length", 0))).decode()
        headers = {k.lower(): v for k, v in request.headers.items()}
        verified = []
        for index, secret in enumerate(self.secrets):
            try:
                Webhook(secret).verify(raw, headers)
                verified.append(index)
            except WebhookVerificationError:
                pass
        with self._lock:
            answer = self._script.popleft() if self._script else 200
            status, extra = answer if isinstance(answer, tuple) else (answer, {})
            try:
                body = json.loads(raw)
            except ValueError:
                body = None
            self.deliveries.append(Delivery(headers.get("webhook-id"), headers, body, verified, status,
                                            time.monotonic(), time.time()))
        request.send_response(status)
        for name, value in extra.items():
            request.send_header(name, value)
        request.send_header("Content-Length", "0")
        request.end_headers()

    def of(self, webhook_id):
        with self._lock:
            return [d for d in self.deliveries if d.webhook_id == webhook_id]

    def accepted(self):
        """The deliveries answered with a 2xx."""
        with self._lock:
            return [d for d in self.deliveries if 200 <= d.status < 300]
