"""The ``queue-engine`` command line.

Each command parses its options, calls one function and prints what happened.
Commands that need Flask, Celery or vLLM import them when they run, so the
domain package stays free of them and ``--help`` stays fast.
"""

import logging
import os
import shutil
import sys
import tempfile

import click

from . import cli_logging
from .cli_keys import keys
from .db import make_sessions, upgrade_database
from .errors import QueueEngineError
from .settings import load_settings

def start_embedded_worker(settings, model):
    """Load the engine before anything imports Flask (see workers.runtime)."""
    from workers.runtime import start_embedded_worker

    try:
        return start_embedded_worker(settings, model, log=click.echo)
    except QueueEngineError as e:
        raise click.ClickException(str(e)) from e


def start_cluster_services(settings):
    """Cluster mode: ``serve`` runs the dispatcher (the database's waiting
    work onto the broker) and delivers webhooks."""
    from workers.celery_app import make_celery
    from workers.dispatcher import start_dispatcher
    from workers.webhooks import start_delivery

    celery_app = make_celery(settings)
    sessions = make_sessions(settings.sqlalchemy_url)
    start_dispatcher(celery_app, sessions, settings)
    start_delivery(celery_app, settings, sessions)
    return celery_app


def serve_with_gunicorn(settings, host, port, workers):
    """Cluster mode in production: gunicorn serves the API with ``workers``
    processes while this one runs the dispatcher and webhook delivery; exits
    with gunicorn."""
    from web.server import run_gunicorn

    click.echo(f"queue-engine serving on http://{host}:{port} (cluster mode, gunicorn, {workers} processes)")
    code = run_gunicorn(settings, host, port, workers)
    shutil.rmtree(os.environ[MULTIPROC_ENV], ignore_errors=True)
    # The dispatcher's and delivery's threads end with this process; what
    # they had not done yet waits in the database for the next start.
    logging.shutdown()
    sys.stdout.flush()
    os._exit(code if code >= 0 else 128 - code)


#: prometheus_client's switch to multiprocess mode (``queue_engine.metrics``,
#: not imported here: the switch must be set before prometheus_client is imported).
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def share_metrics_between_processes():
    """``serve --workers N``: this process (the dispatcher, webhook delivery)
    and gunicorn's count into files in one fresh directory, which every
    scrape of ``/metrics`` sums. gunicorn's processes inherit the setting."""
    os.environ[MULTIPROC_ENV] = tempfile.mkdtemp(prefix="queue-engine-metrics-")


def serve_metrics(port):
    """Serve this process's Prometheus metrics on ``port`` (every interface), from a thread."""
    from prometheus_client import start_http_server

    start_http_server(port, addr="0.0.0.0")


def read_settings():
    try:
        return load_settings()
    except QueueEngineError as e:
        raise click.ClickException(str(e)) from e


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--log-level", default="INFO", envvar="QUEUE_ENGINE_LOG_LEVEL", show_default=True, help="Python log level.")
@click.option("-v", "--verbose", is_flag=True, envvar="QUEUE_ENGINE_VERBOSE",
              help="Show the libraries' log lines (Celery per task, vLLM, alembic) on the terminal; "
                   "`demo` and `serve` hold them back otherwise.")
def main(log_level, verbose):
    """queue-engine: batch inference for LLMs on SLURM clusters."""
    cli_logging.log_to_stderr(log_level.upper())


def is_verbose(ctx):
    """Whether ``-v`` was given to ``queue-engine`` itself."""
    return ctx.find_root().params["verbose"]


main.add_command(keys)


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, help="Port to listen on.")
@click.option("--worker-model", default="tiny", show_default=True,
              help="Embedded mode only: the model profile the in-process worker serves.")
@click.option("--workers", "web_workers", type=click.IntRange(1, 256), default=None,
              envvar="QUEUE_ENGINE_WEB_WORKERS",
              help="Cluster mode: serve the API with gunicorn and this many processes (the production server); "
                   "default one waitress process.")
def serve(host, port, worker_model, web_workers):
    """Serve the HTTP API, send waiting work to the broker and deliver webhooks
    (embedded mode also runs a worker inside)."""
    if not is_verbose(click.get_current_context()):
        cli_logging.quiet_chatty_libraries()
    settings = read_settings()
    if web_workers and settings.is_embedded:
        raise click.ClickException("--workers needs cluster mode (set QUEUE_ENGINE_BROKER_URL): "
                                   "embedded mode runs in one process")
    if web_workers:
        share_metrics_between_processes()
    if settings.is_embedded:
        celery_app = start_embedded_worker(settings, worker_model)
    else:
        celery_app = start_cluster_services(settings)
    if web_workers:
        serve_with_gunicorn(settings, host, port, web_workers)
    from web import create_app
    from web.server import build_server, embedded_key_path, embedded_secret_path, ensure_embedded_key

    # The app enqueues on the Celery app whose in-process worker runs.
    server = build_server(create_app(settings, celery_app), host, port)
    if settings.is_embedded:
        new_key = ensure_embedded_key(settings)
        if new_key:
            click.echo(f"created an API key (kept in {embedded_key_path(settings)}): {new_key.key}\n"
                       f"its webhook secret (kept in {embedded_secret_path(settings)}): {new_key.webhook_secret}")
    click.echo(f"queue-engine serving on http://{host}:{server.effective_port}"
               f" ({'embedded' if settings.is_embedded else 'cluster'} mode)")
    server.run()


@main.command()
@click.option("--model", "-m", required=True, help="The model profile to serve.")
@click.option("--concurrency", type=int, default=None, help="Task threads; default the profile's max_in_flight.")
@click.option("--metrics-port", type=int, default=None, envvar="QUEUE_ENGINE_METRICS_PORT",
              help="Serve Prometheus metrics on this port (the README's scrape config uses 9320); default none.")
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
        serve_metrics(metrics_port)
    try:
        code = run_worker(make_celery(settings), model, concurrency) or 0
    except SystemExit as e:  # how Celery ends a warm shutdown
        code = e.code if isinstance(e.code, int) else 1 if e.code else 0
    # Everything is finished and stored by now. Interpreter teardown would
    # spend seconds in torch's native code, and a worker told to stop
    # (scale-in, walltime) should give its GPUs back at once.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@main.command()
@click.option("--once", is_flag=True, help="Decide once and exit (to see what it would do, or from cron).")
@click.option("--metrics-port", type=int, default=None, envvar="QUEUE_ENGINE_AUTOSCALER_METRICS_PORT",
              help="Serve Prometheus metrics on this port (the README's scrape config uses 9321); default none.")
def autoscale(once, metrics_port):
    """Submit and stop SLURM worker jobs as the queues of the models with a
    [models.X.slurm] table grow and drain. Several may run for one deployment:
    one leads, the others stand by and take over if it dies."""
    import signal
    import threading

    from slurm.autoscaler import Autoscaler
    from slurm.commands import Slurm

    settings = read_settings()
    if settings.is_embedded:
        raise click.ClickException("autoscale needs a broker: set QUEUE_ENGINE_BROKER_URL (cluster mode)")
    autoscaler = Autoscaler(settings, make_sessions(settings.sqlalchemy_url),
                            Slurm(timeout=settings.autoscaler.command_timeout))
    if not autoscaler.models:
        raise click.ClickException("no model profile has a [models.X.slurm] table; nothing to scale")
    if metrics_port and not once:
        serve_metrics(metrics_port)
    if once:
        try:
            led = autoscaler.step()
        finally:
            autoscaler.release()
        if not led:
            click.echo(f"another autoscaler leads deployment {autoscaler.deployment!r}; did nothing")
        return
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    autoscaler.run(stop)


@main.command("slurm-script")
@click.option("--model", "-m", required=True, help="The model profile.")
def slurm_script(model):
    """Print the SLURM batch script of a worker job for MODEL."""
    from slurm.jobscript import render

    try:
        click.echo(render(read_settings(), model), nl=False)
    except QueueEngineError as e:
        raise click.ClickException(str(e)) from e


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
@click.option("--prompts", type=int, default=8, show_default=True, help="How many sample prompts to run.")
@click.option("-v", "--verbose", is_flag=True, help="Show the log lines here too, not only in the log file.")
@click.pass_context
def demo(ctx, prompts, verbose):
    """Start the embedded service, run sample prompts through it over HTTP, print the results.

    Log lines go to DATA_DIR/logs/queue-engine.log (and with -v to the terminal)."""
    settings = read_settings()
    if not settings.is_embedded:
        raise click.ClickException("the demo runs in embedded mode; unset QUEUE_ENGINE_BROKER_URL")
    verbose = verbose or is_verbose(ctx)
    log_file = settings.data_dir / "logs" / "queue-engine.log"
    cli_logging.log_to_file(log_file, ctx.find_root().params["log_level"].upper(), verbose)
    click.echo(f"logging to {log_file}" + ("" if verbose else " (-v shows the log here too)"))
    with cli_logging.stderr_to(log_file, enabled=not verbose):
        celery_app = start_embedded_worker(settings, "tiny")
        from web.demo import run_demo

        run_demo(settings, celery_app, prompts, echo=click.echo)


from .cli_client import results, status, submit  # noqa: E402  (their own modules; they need nothing of this one)
from .cli_usage import usage_command  # noqa: E402

for command in (submit, status, results, usage_command):
    main.add_command(command)

if __name__ == "__main__":
    main()
