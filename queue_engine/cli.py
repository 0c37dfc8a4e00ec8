"""The ``queue-engine`` command line.

Each command parses its options, calls one function and prints what happened.
Commands that need Flask, Celery or vLLM import them when they run, so the
domain package stays free of them and ``--help`` stays fast.
"""

import json
import logging
import os
import sys

import click

from .cli_keys import keys
from .db import make_sessions, upgrade_database
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
    # The dispatcher's and delivery's threads end with this process; what
    # they had not done yet waits in the database for the next start.
    logging.shutdown()
    sys.stdout.flush()
    os._exit(code if code >= 0 else 128 - code)


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
    settings = read_settings()
    if web_workers and settings.is_embedded:
        raise click.ClickException("--workers needs cluster mode (set QUEUE_ENGINE_BROKER_URL): "
                                   "embedded mode runs in one process")
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
def autoscale(once):
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


def server_options(command):
    """The --url and --key options of the commands that talk to a server."""
    command = click.option("--key", envvar="QUEUE_ENGINE_API_KEY", required=True,
                           help="Your API key (or QUEUE_ENGINE_API_KEY).")(command)
    return click.option("--url", default=DEFAULT_URL, envvar="QUEUE_ENGINE_URL", show_default=True,
                        help="The server (or QUEUE_ENGINE_URL).")(command)


def api_client(url, key):
    from .client import Client

    return Client(url, key, timeout=600)


@main.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False), required=False)
@click.option("--prompt", help="A prompt to run as a single job (instead of FILE).")
@click.option("--model", "-m", default="tiny", show_default=True, help="The model profile.")
@click.option("--max-tokens", type=int, default=None, help="Tokens to generate per prompt (server default 256).")
@click.option("--prompt-column", default=None, help="FILE's prompt column (default 'prompt').")
@click.option("--id-column", default=None, help="FILE's id column (default 'id'; without one rows are numbered).")
@click.option("--delimiter", default=None, help="FILE's CSV delimiter (default: sniffed).")
@click.option("--template", default=None,
              help="CSV FILE: build each prompt from this text, {column} filled from the row (instead of "
                   "--prompt-column; {{ and }} are literal braces).")
@click.option("--system", default=None, help="CSV FILE: a system message; rows run as chat messages.")
@click.option("--params-columns", default=None,
              help='CSV FILE: per-row parameters from columns, as JSON: \'{"max_tokens": "budget"}\'.')
@click.option("--empty-cells", type=click.Choice(["fail", "empty"]), default=None,
              help="CSV FILE with --template: a row whose placeholder cell is empty fails (default) or fills it empty.")
@click.option("--keep-columns", is_flag=True, default=None,
              help="CSV FILE: keep every column of the file, for the results.")
@click.option("--dry-run", is_flag=True,
              help="Check FILE and count its tokens; store nothing. Prints the counts and the first rows.")
@click.option("--schema", "schema_file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="A JSON Schema file: answers are JSON following it (response_format json_schema); "
                   "a batch's results get a column per top-level property.")
@click.option("--choices", default=None,
              help="Answers are one of these, comma-separated (response_format choice; results column 'answer').")
@click.option("--judge", default=None, help="Run --prompt as a tribunal that this model judges.")
@click.option("--candidates", default=None,
              help="The tribunal's candidate models, comma-separated (default: --model, twice).")
@click.option("--reviser", default=None, help="The tribunal's reviser (default: the judge).")
@click.option("--bypass", type=click.Choice(["auto", "never", "always"]), default="auto", show_default=True,
              help="When the tribunal runs as a single pass.")
@click.option("--wait", is_flag=True, help="Wait until done: print the job's text, or show the batch's progress.")
@server_options
def submit(file, prompt, model, max_tokens, prompt_column, id_column, delimiter, template, system, params_columns,
           empty_cells, keep_columns, dry_run, schema_file, choices, judge, candidates, reviser, bypass, wait, url,
           key):
    """Submit FILE (CSV or JSONL) as a batch, or --prompt TEXT as a job (a
    tribunal with --judge); print its id."""
    if (file is None) == (prompt is None):
        raise click.UsageError("give a FILE to run as a batch, or --prompt TEXT, not both")
    file_options = {"template": template, "system": system, "params_columns": params_columns,
                    "empty_cells": empty_cells, "keep_columns": keep_columns or None, "dry_run": dry_run or None}
    given = [f"--{name.replace('_', '-')}" for name, value in file_options.items() if value is not None]
    if file is None and given:
        raise click.UsageError(f"{', '.join(given)} describe a FILE batch; give a FILE")
    if params_columns is not None:
        try:
            params_columns = json.loads(params_columns)
        except ValueError as e:
            raise click.BadParameter(f"not JSON ({e}); e.g. '{{\"max_tokens\": \"budget\"}}'",
                                     param_hint="--params-columns") from None
    if judge is None and (candidates or reviser):
        raise click.UsageError("--candidates and --reviser need --judge (they describe a tribunal)")
    client = api_client(url, key)
    params = {"max_tokens": max_tokens} if max_tokens else {}
    response_format = read_response_format(schema_file, choices)
    if response_format:
        params["response_format"] = response_format
    try:
        if prompt is not None and judge is not None:
            body = {"prompt": prompt, "params": params, "judge": judge, "reviser": reviser, "bypass": bypass,
                    "candidates": candidates.split(",") if candidates else [model, model]}
            run_prompt(client, client.submit_tribunal({k: v for k, v in body.items() if v is not None}), wait)
        elif prompt is not None:
            run_prompt(client, client.submit_job({"model": model, "prompt": prompt, "params": params}), wait)
        elif dry_run:
            click.echo(dry_run_summary(client.submit_batch(
                file, model, params=params, dry_run=True, prompt_column=prompt_column, id_column=id_column,
                delimiter=delimiter, template=template, system=system, params_columns=params_columns,
                empty_cells=empty_cells, keep_columns=keep_columns or None)))
        else:
            submit_file(client, file, model, params, wait,
                        prompt_column=prompt_column, id_column=id_column, delimiter=delimiter, template=template,
                        system=system, params_columns=params_columns, empty_cells=empty_cells,
                        keep_columns=keep_columns or None)
    except QueueEngineError as e:
        raise click.ClickException(str(e)) from e


def run_prompt(client, job, wait):
    """Print the submitted job's id, or with ``wait`` its text once it is done."""
    if not wait:
        click.echo(job["id"])
        return
    job = client.wait_for_job(job["id"])
    if job["status"] != "succeeded":
        raise click.ClickException(f"job {job['id']} ended {job['status']}: {job['error']}")
    click.echo(job["result"]["text"])


def submit_file(client, path, model, params, wait, **fields):
    from tqdm import tqdm

    batch = client.submit_batch(path, model, params=params, **fields)
    click.echo(batch["id"])
    if not wait:
        return
    with tqdm(total=batch["request_counts"]["total"], unit="row", desc=batch["id"], file=sys.stderr) as bar:
        def show(batch):
            counts = batch["request_counts"]
            bar.update(counts["completed"] + counts["failed"] + counts["cancelled"] - bar.n)
            bar.set_postfix(failed=counts["failed"], status=batch["status"], refresh=False)

        batch = client.wait_for_batch(batch["id"], on_progress=show)
    click.echo(batch_summary(batch))


def dry_run_summary(preview):
    """A dry run's answer, for reading: counts, tokens, the first row errors and rows."""
    counted = ("counted with the model's tokenizer" if preview["tokens_counted_with"] == "tokenizer"
               else f"estimated at 4 characters a token: {preview['tokenizer_error']}")
    lines = [f"dry run of {preview['format']} batch for model {preview['model']!r}: nothing was stored",
             f"rows: {preview['rows']} ({preview['runnable_rows']} would run, {preview['failed_rows']} would fail)",
             f"prompt tokens: {preview['prompt_tokens']} ({counted})"]
    if preview["row_errors"]:
        lines.append("failing rows:")
        lines += [f"  line {e['line']}, id {e['id']!r}: {e['code']}: {e['message']}" for e in preview["row_errors"]]
    lines.append(f"first {len(preview['first_rows'])} rows:")
    for row in preview["first_rows"]:
        lines.append(f"--- {row['id']}" + (f"  params {json.dumps(row['params'])}" if row["params"] else "")
                     + (f"  (fails: {row['error']['message']})" if row["error"] else ""))
        if row["messages"] is not None:
            lines += [f"[{message['role']}] {message['content']}" for message in row["messages"]]
        else:
            lines.append(row["prompt"])
    return "\n".join(lines)


def batch_summary(batch):
    counts = batch["request_counts"]
    done = counts["completed"] + counts["failed"] + counts["cancelled"]
    return (f"{batch['id']} {batch['status']}: {done}/{counts['total']} rows ended "
            f"({counts['completed']} completed, {counts['failed']} failed, {counts['cancelled']} cancelled)")


@main.command()
@click.argument("object_id")
@click.option("--json", "as_json", is_flag=True, help="Print a batch as its JSON object.")
@server_options
def status(object_id, as_json, url, key):
    """Print the job OBJECT_ID as JSON, or the batch OBJECT_ID's counts."""
    client = api_client(url, key)
    try:
        if not object_id.startswith("batch_"):
            click.echo(json.dumps(client.get_job(object_id), indent=2))
            return
        batch = client.get_batch(object_id)
    except QueueEngineError as e:
        raise click.ClickException(str(e)) from e
    click.echo(json.dumps(batch, indent=2) if as_json else batch_summary(batch))


def read_response_format(schema_file, choices):
    """The ``response_format`` that ``--schema`` or ``--choices`` ask for; None for neither."""
    if schema_file and choices:
        raise click.UsageError("give --schema or --choices, not both")
    if choices is not None:
        return {"type": "choice", "choices": [choice.strip() for choice in choices.split(",")]}
    if schema_file is None:
        return None
    try:
        with open(schema_file, encoding="utf-8") as file:
            return {"type": "json_schema", "schema": json.load(file)}
    except ValueError as e:
        raise click.BadParameter(f"{schema_file!r} is not JSON ({e})", param_hint="--schema") from None


#: The results format an --output name implies; csv otherwise.
RESULTS_EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".xlsx": "xlsx"}


@main.command()
@click.argument("batch_id")
@click.option("--output", "-o", type=click.Path(dir_okay=False, writable=True), help="Write here instead of stdout.")
@click.option("--format", "file_format", type=click.Choice(["csv", "jsonl", "xlsx"]), default=None,
              help="Default: from the --output name (.jsonl, .ndjson, .xlsx), else csv.")
@server_options
def results(batch_id, output, file_format, url, key):
    """Write the results of BATCH_ID (one row per input row, in input order)."""
    extension = os.path.splitext(output or "")[1].lower()
    file_format = file_format or RESULTS_EXTENSIONS.get(extension, "csv")
    client = api_client(url, key)
    try:
        if output is None:
            client.write_results(batch_id, sys.stdout.buffer, file_format)
            return
        with open(output, "wb") as out:
            client.write_results(batch_id, out, file_format)
    except QueueEngineError as e:
        raise click.ClickException(str(e)) from e
    click.echo(f"wrote {output}", err=True)


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


from .cli_usage import usage_command  # noqa: E402  (its own module; it needs nothing of this one)
main.add_command(usage_command)

if __name__ == "__main__":
    main()
