"""``queue-engine demo``: the embedded service, end to end, in one command."""

import threading
import time

from queue_engine.apikeys import create_api_key
from queue_engine.client import Client
from queue_engine.db import transaction

from . import create_app
from .server import build_server

SAMPLE_PROMPTS = [
    "The list type",
    "A function definition",
    "The import statement",
    "Exceptions are",
    "A dictionary maps",
    "The with statement",
    "Class instances",
    "The for loop",
]


def run_demo(settings, celery_app, count=8, echo=print):
    """Serve on a free port, push ``count`` prompts through HTTP, print the answers."""
    app = create_app(settings, celery_app)
    server = build_server(app, port=0)
    url = f"http://127.0.0.1:{server.effective_port}"
    threading.Thread(target=server.run, name="demo-server", daemon=True).start()
    # The app's own session factory: no second connection pool for one key.
    with transaction(app.extensions["qe_sessions"]) as session:
        key = create_api_key(session, f"demo-{time.time_ns()}").key
    client = Client(url, key)
    echo(f"embedded queue-engine on {url}; submitting {count} prompts to model 'tiny'")
    started = time.monotonic()
    prompts = [SAMPLE_PROMPTS[i % len(SAMPLE_PROMPTS)] for i in range(count)]
    submitted = [client.submit_job({"model": "tiny", "prompt": p, "params": {"max_tokens": 32, "temperature": 0}})
                 for p in prompts]
    finished = [client.wait_for_job(job["id"], timeout=300) for job in submitted]
    elapsed = time.monotonic() - started
    for prompt, job in zip(prompts, finished):
        text = job["result"]["text"] if job["result"] else job["error"]
        echo(f"[{job['status']}] {prompt!r} -> {text!r}")
    tokens = sum(job["usage"]["completion_tokens"] for job in finished if job["usage"])
    echo(f"{count} jobs, {tokens} tokens in {elapsed:.1f} s over HTTP")
    client.session.close()
    server.close()
    return finished
