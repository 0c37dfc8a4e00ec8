"""The ``queue-engine`` commands that talk to a running server over its API:
``submit``, ``status`` and ``results``."""

import json
import os
import sys

import click

from .errors import QueueEngineError

DEFAULT_URL = "http://127.0.0.1:8000"


def server_options(command):
    """The --url and --key options of the commands that talk to a server."""
    command = click.option("--key", envvar="QUEUE_ENGINE_API_KEY", required=True,
                           help="Your API key (or QUEUE_ENGINE_API_KEY).")(command)
    return click.option("--url", default=DEFAULT_URL, envvar="QUEUE_ENGINE_URL", show_default=True,
                        help="The server (or QUEUE_ENGINE_URL).")(command)


def api_client(url, key):
    from .client import Client

    return Client(url, key, timeout=600)


@click.command()
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


@click.command()
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


@click.command()
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


