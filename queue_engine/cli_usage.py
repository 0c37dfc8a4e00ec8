"""``queue-engine usage``: every key's usage as CSV, read from the database (an operator's tool)."""

import csv
import sys

import click

from . import usage
from .db import make_sessions, upgrade_database
from .errors import QueueEngineError
from .models import utcnow
from .settings import load_settings

#: The CSV columns after the group's own.
COLUMNS = ("requests", "prompt_tokens", "completion_tokens", "total_tokens", "engine_seconds")


def write_usage_csv(rows, group_by, out):
    """``rows`` (as :func:`queue_engine.usage.read_usage` returns them) as CSV with a header row."""
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow((group_by, *COLUMNS))
    for row in rows:
        group = row[group_by].isoformat() if group_by == "day" else row[group_by]
        writer.writerow((group, *(round(row[name], 6) if name == "engine_seconds" else row[name] for name in COLUMNS)))


@click.command("usage")
@click.option("--from", "date_from", default=None, help="First day, YYYY-MM-DD (default: the first of this month, UTC).")
@click.option("--to", "date_to", default=None, help="Last day, included, YYYY-MM-DD (default: today, UTC).")
@click.option("--by", "group_by", type=click.Choice(sorted(usage.GROUPS)), default="key", show_default=True,
              help="One CSV row per key (its name), model or day.")
@click.option("--key", "key_name", default=None, help="Only the key of this name (default: every key).")
def usage_command(date_from, date_to, group_by, key_name):
    """Print every key's usage (finished requests, tokens, engine seconds) as CSV."""
    try:
        settings = load_settings()
        date_from, date_to = usage.period(date_from, date_to, utcnow().date())
        upgrade_database(settings.sqlalchemy_url)
        with make_sessions(settings.sqlalchemy_url)() as session:
            rows = usage.read_usage(session, None, date_from, date_to, group_by, key_name=key_name)
    except QueueEngineError as e:
        raise click.ClickException(str(e)) from e
    write_usage_csv(rows, group_by, sys.stdout)
    if not rows:
        click.echo(f"no usage from {date_from} to {date_to}", err=True)
