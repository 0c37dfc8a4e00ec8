"""A small HTTP client for the native API, used by the CLI and the demo."""

import time

import requests

from .errors import QueueEngineError

FINISHED = {"succeeded", "failed", "cancelled"}


class ApiError(QueueEngineError):
    """The server answered with an error object."""

    def __init__(self, status, code, message):
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code = status, code


class Client:
    def __init__(self, url, key, timeout=30):
        self.url = url.rstrip("/")
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {key}"
        self.timeout = timeout

    def _call(self, method, path, **kwargs):
        response = self.session.request(method, self.url + path, timeout=self.timeout, **kwargs)
        if response.status_code >= 400:
            try:
                error = response.json()["error"]
            except (ValueError, KeyError, TypeError):
                error = {"code": "http_error", "message": response.text[:200]}
            raise ApiError(response.status_code, error.get("code"), error.get("message"))
        return response.json()

    def submit_job(self, body, idempotency_key=None):
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._call("POST", "/api/v1/jobs", json=body, headers=headers)

    def get_job(self, job_id):
        return self._call("GET", f"/api/v1/jobs/{job_id}")

    def wait_for_job(self, job_id, timeout=600, interval=0.2):
        """Poll until the job finishes; raises TimeoutError after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.get_job(job_id)
            if job["status"] in FINISHED:
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['status']} after {timeout} s")
            time.sleep(interval)
