"""The ``queue-engine`` command line.

Each command parses its options, calls one function and prints what happened.
Commands that need Flask, Celery or vLLM import them when they run, so the
domain package stays free of them and ``--help`` stays fast.
"""

import json
import logging
import sys

import click

from .db import make_sessions, transaction, upgrade_database
from .errors import QueueEngineError
from .settings import load_settings

DEFAULT_URL = "http://127.0.0.1:8000"


def start_embedded_worker(settings, model):
    """Load the engine before anything imports Flask (see workers.runtime)."""
    from workers.runtime import start_embedded_worker

    try:
        return start_embedded_worker(settings, model, log=click.echo)
    except QueueEngineError as e:
        raise click.ClickException(str(e)) from e


def read_settings():
    try:
        return load_settings()
    except QueueEngineError as e:
        raise click.ClickException(str(e)) from e


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--log-level", default="INFO", envvar="QUEUE_ENGINE_LOG_LEVEL", show_default=True, help="Python log level.")
def main(log_level):
    """queue-engine: batch inference for LLMs on SLURM clusters."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, help="Port to listen on.")
@click.option("--worker-model", default="tiny", show_default=True,
              help="Embedded mode only: the model profile the in-process worker serves.")
def serve(host, port, worker_model):
    """Serve the HTTP API (embedded mode also runs a worker inside)."""
    settings = read_settings()
    celery_app = start_embedded_worker(settings, worker_model) if settings.is_embedded else None
    from web import create_app
    from web.server import build_server, embedded_key_path, ensure_embedded_key

    # In embedded mode the app enqueues on the Celery app whose in-process worker runs.
    server = build_server(create_app(settings, celery_app), host, port)
    if settings.is_embedded:
        key = ensure_embedded_key(settings)
        if key:
            click.echo(f"created an API key (kept in {embedded_key_path(settings)}): {key}")
    click.echo(f"queue-engine serving on http://{host}:{server.effective_port}"
               f" ({'embedded' if settings.is_embedded else 'cluster'} mode)")
    server.run()


@main.command()
@click.option("--model", "-m", required=True, help="The model profile to serve.")
@click.option("--concurrency", type=int, default=None, help="Task threads; default the profile's max_in_flight.")
@click.option("--metrics-port", type=int, default=None, envvar="QUEUE_ENGINE_METRICS_PORT",
              help="Serve Prometheus metrics on this port.")
def worker(model, concurrency, metrics_port):
    """Run a Celery worker with an in-process engine for MODEL."""
    from workers.celery_app import make_celery
    from workers.runtime import run_worker

    settings = read_settings()
    try:
        settings.profile(model)
    except QueueEngineError as e:
        raise click.ClickException(str(e)) from e
    if metrics_port:
        from prometheus_client import start_http_server

        start_http_server(metrics_port, addr="0.0.0.0")
    sys.exit(run_worker(make_celery(settings), model, concurrency) or 0)


@main.group()
def db():
    """Database schema commands."""


@db.command("upgrade")
def db_upgrade():
    """Apply every migration to the configured database."""
    settings = read_settings()
    upgrade_database(settings.sqlalchemy_url)
    click.echo(f"database is up to date: {settings.sqlalchemy_url.split('@')[-1]}")


@main.group()
def keys():
    """API key commands."""


@keys.command("create")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object {name, key, webhook_secret}.")
def keys_create(name, as_json):
    """Create an API key called NAME and print it (only this once)."""
    from .apikeys import create_api_key

    settings = read_settings()
    upgrade_database(settings.sqlalchemy_url)
    sessions = make_sessions(settings.sqlalchemy_url)
    try:
        with transaction(sessions) as session:
            new_key = create_api_key(session, name)
    except QueueEngineError as e:
        raise click.ClickException(str(e)) from e
    if as_json:
        click.echo(json.dumps({"name": new_key.name, "key": new_key.key, "webhook_secret": new_key.webhook_secret}))
    else:
        click.echo(f"key:            {new_key.key}\nwebhook secret: {new_key.webhook_secret}\n"
                   "Store both now; only a hash of the key is kept.")


@main.group()
def models():
    """Model commands."""


@models.command("build-tiny")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--size", type=click.Choice(["small", "large"]), default="small", show_default=True,
              help="small: 1.3M parameters (tests, demo); large: hidden 512 (benchmarks).")
def build_tiny(directory, size):
    """Build the project's tiny Llama model and tokenizer into DIRECTORY."""
    from workers.tiny_model import build_tiny_model

    build_tiny_model(directory, size, log=click.echo)


@main.command()
@click.option("--prompt", required=True, help="The prompt text.")
@click.option("--model", "-m", default="tiny", show_default=True, help="The model profile.")
@click.option("--max-tokens", type=int, default=64, show_default=True, help="Tokens to generate.")
@click.option("--wait", is_flag=True, help="Wait for the job to finish and print its text.")
@click.option("--url", default=DEFAULT_URL, envvar="QUEUE_ENGINE_URL", show_default=True, help="The server.")
@click.option("--key", envvar="QUEUE_ENGINE_API_KEY", required=True, help="Your API key.")
def submit(prompt, model, max_tokens, wait, url, key):
    """Submit a prompt as a job and print its id (or, with --wait, its text)."""
    from .client import Client

    client = Client(url, key)
    job = client.submit_job({"model": model, "prompt": prompt, "params": {"max_tokens": max_tokens}})
    if not wait:
        click.echo(job["id"])
        return
    job = client.wait_for_job(job["id"])
    if job["status"] != "succeeded":
        raise click.ClickException(f"job {job['id']} ended {job['status']}: {job['error']}")
    click.echo(job["result"]["text"])


@main.command()
@click.argument("job_id")
@click.option("--url", default=DEFAULT_URL, envvar="QUEUE_ENGINE_URL", show_default=True, help="The server.")
@click.option("--key", envvar="QUEUE_ENGINE_API_KEY", required=True, help="Your API key.")
def status(job_id, url, key):
    """Print the job JOB_ID as JSON."""
    from .client import Client

    click.echo(json.dumps(Client(url, key).get_job(job_id), indent=2))


@main.command()
@click.option("--prompts", type=int, default=8, show_default=True, help="How many sample prompts to run.")
def demo(prompts):
    """Start the embedded service, run sample prompts through it over HTTP, print the results."""
    settings = read_settings()
    if not settings.is_embedded:
        raise click.ClickException("the demo runs in embedded mode; unset QUEUE_ENGINE_BROKER_URL")
    celery_app = start_embedded_worker(settings, "tiny")
    from web.demo import run_demo

    run_demo(settings, celery_app, prompts, echo=click.echo)


if __name__ == "__main__":
    main()
