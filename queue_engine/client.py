"""A small HTTP client for the native API, used by the CLI and the demo."""

import json
import time
from pathlib import Path

import requests

from .errors import QueueEngineError

FINISHED = {"succeeded", "failed", "cancelled"}
BATCH_ENDED = {"completed", "failed", "cancelled"}


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

    def _call(self, method, path, stream=False, **kwargs):
        response = self.session.request(method, self.url + path, timeout=self.timeout, stream=stream, **kwargs)
        if response.status_code >= 400:
            try:
                error = response.json()["error"]
            except (ValueError, KeyError, TypeError):
                error = {"code": "http_error", "message": response.text[:200]}
            raise ApiError(response.status_code, error.get("code"), error.get("message"))
        return response if stream else response.json()

    def submit_job(self, body, idempotency_key=None):
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._call("POST", "/api/v1/jobs", json=body, headers=headers)

    def submit_tribunal(self, body, idempotency_key=None):
        """Submit a tribunal; it is read, waited for and cancelled as a job."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._call("POST", "/api/v1/tribunals", json=body, headers=headers)

    def cancel_job(self, job_id):
        return self._call("POST", f"/api/v1/jobs/{job_id}/cancel")

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

    def submit_batch(self, file, model, filename=None, params=None, dry_run=False, **fields):
        """Upload ``file`` (a path or a binary file object) as a batch of ``model``.

        ``fields`` are the other form fields (``prompt_column``, ``id_column``,
        ``delimiter``, ``webhook_url``, ``template``, ``system``,
        ``params_columns`` (a dict, sent as JSON), ``empty_cells``,
        ``keep_columns`` (a bool)). With ``dry_run`` the server checks and
        reads the file, stores nothing and answers what the batch would be.
        """
        form = {"model": model, **{name: value for name, value in fields.items() if value is not None}}
        if params:
            form["params"] = json.dumps(params)
        for name, value in form.items():
            if isinstance(value, bool):
                form[name] = "true" if value else "false"
            elif isinstance(value, dict):
                form[name] = json.dumps(value)
        query = {"params": {"dry_run": "true"}} if dry_run else {}
        if isinstance(file, (str, Path)):
            with open(file, "rb") as f:
                return self._call("POST", "/api/v1/batches", data=form,
                                  files={"file": (filename or Path(file).name, f)}, **query)
        return self._call("POST", "/api/v1/batches", data=form, files={"file": (filename or "upload", file)}, **query)

    def get_batch(self, batch_id):
        return self._call("GET", f"/api/v1/batches/{batch_id}")

    def cancel_batch(self, batch_id):
        return self._call("POST", f"/api/v1/batches/{batch_id}/cancel")

    def wait_for_batch(self, batch_id, timeout=3600, interval=0.5, on_progress=None):
        """Poll until the batch ends, calling ``on_progress(batch)`` after each look."""
        deadline = time.monotonic() + timeout
        while True:
            batch = self.get_batch(batch_id)
            if on_progress is not None:
                on_progress(batch)
            if batch["status"] in BATCH_ENDED:
                return batch
            if time.monotonic() > deadline:
                raise TimeoutError(f"batch {batch_id} still {batch['status']} after {timeout} s")
            time.sleep(interval)

    def webhooks(self, work_id):
        """Every attempt to deliver the webhook events of a job or batch (by its id)."""
        return self._call("GET", f"/api/v1/{_collection(work_id)}/{work_id}/webhooks")

    def redeliver_webhook(self, work_id):
        """Send the last webhook event of a job or batch again, with the same id."""
        return self._call("POST", f"/api/v1/{_collection(work_id)}/{work_id}/webhooks/redeliver")

    def models(self):
        """``{model: status}``: each profile's backlog, workers and last scaling decision."""
        return {m["model"]: m for m in self._call("GET", "/api/v1/models")["data"]}

    def write_results(self, batch_id, out, file_format="csv"):
        """Stream the batch's results into the binary file object ``out``."""
        response = self._call("GET", f"/api/v1/batches/{batch_id}/results", stream=True,
                              params={"format": file_format})
        with response:
            for piece in response.iter_content(chunk_size=1 << 16):
                out.write(piece)


def _collection(work_id):
    return "batches" if work_id.startswith("batch_") else "jobs"
