"""``queue-engine keys``: create, limit, show and revoke API keys, on the
configured database (the service need not run)."""

import json
from contextlib import contextmanager

import click

from . import apikeys, quotas
from .db import make_sessions, transaction, upgrade_database
from .errors import QueueEngineError
from .settings import load_settings

#: What ``set-limits`` reads as "no limit".
UNLIMITED = ("none", "unlimited")


@contextmanager
def key_transaction():
    """A transaction on the configured (migrated) database. The one place
    where a domain error, or bad settings, becomes a CLI error: exit 1 with
    its message."""
    try:
        settings = load_settings()
        upgrade_database(settings.sqlalchemy_url)
        with transaction(make_sessions(settings.sqlalchemy_url)) as session:
            yield session
    except QueueEngineError as e:
        raise click.ClickException(str(e)) from e


class LimitType(click.ParamType):
    """A limit: a number, or ``none``/``unlimited`` (None)."""

    def __init__(self, convert_number, kind):
        self.convert_number, self.name = convert_number, kind

    def convert(self, value, param, ctx):
        if value is None or isinstance(value, (int, float)):
            return value
        if value.strip().lower() in UNLIMITED:
            return None
        try:
            return self.convert_number(value)
        except ValueError:
            self.fail(f"{value!r} is not {self.name}, none or unlimited", param, ctx)


WHOLE = LimitType(int, "a whole number")


@click.group()
def keys():
    """API key commands."""


@keys.command("create")
@click.argument("name")
@click.option("--operator", is_flag=True, help="An operator key: sees and may cancel every key's work, "
                                               "sees /api/v1/models, may revoke keys.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object {name, key, webhook_secret}.")
def keys_create(name, operator, as_json):
    """Create an API key called NAME and print it (only this once)."""
    with key_transaction() as session:
        new_key = apikeys.create_api_key(session, name, is_operator=operator)
    if as_json:
        click.echo(json.dumps({"name": new_key.name, "key": new_key.key, "webhook_secret": new_key.webhook_secret}))
    else:
        click.echo(f"key:            {new_key.key}\nwebhook secret: {new_key.webhook_secret}\n"
                   "Store both now; only a hash of the key is kept.")


@keys.command("rotate-secret")
@click.argument("name")
@click.option("--grace-hours", type=float, default=24.0, show_default=True,
              help="Hours during which the old secret signs too.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object {name, webhook_secret, previous_valid_until}.")
def keys_rotate_secret(name, grace_hours, as_json):
    """Give key NAME a new webhook secret; the old one also signs for the grace period."""
    with key_transaction() as session:
        secret, until = apikeys.rotate_webhook_secret(session, name, grace_hours)
    if as_json:
        click.echo(json.dumps({"name": name, "webhook_secret": secret, "previous_valid_until": until.isoformat()}))
    else:
        click.echo(f"webhook secret: {secret}\nThe previous secret also signs until {until.isoformat()}.")


@keys.command("set-limits")
@click.argument("name")
@click.option("--share", type=float, default=None, help="Its weight in the bulk lane's fair share (default 1).")
@click.option("--max-waiting-rows", type=WHOLE, help="Requests waiting or running at once (none: unlimited).")
@click.option("--max-waiting-tokens", type=WHOLE,
              help="Estimated tokens (prompt characters / 4 + max_tokens) waiting or running at once (none: unlimited).")
@click.option("--requests-per-minute", type=WHOLE, help="API requests per minute (none: unlimited).")
@click.option("--token-budget", type=WHOLE,
              help="Prompt + completion tokens per --budget-period, after which new work is refused (none: unlimited).")
@click.option("--budget-period", type=click.Choice(apikeys.BUDGET_PERIODS), default=None,
              help="The token budget's period, a UTC day or month.")
@click.pass_context
def keys_set_limits(ctx, name, **options):
    """Change the share and quotas of key NAME; limits not given stay as they are."""
    given = {option: value for option, value in options.items()
             if ctx.get_parameter_source(option) == click.core.ParameterSource.COMMANDLINE}
    if not given:
        raise click.UsageError("give at least one limit to change (see --help)")
    with key_transaction() as session:
        apikeys.set_key_limits(session, name, **given)
        shown = quotas.describe_key(session, name)
    click.echo(f"key {name!r}: " + ", ".join(f"{field} {describe_value(field, shown[field])}" for field in (
        "share", *apikeys.LIMITS, "budget_period")))


def describe_value(field, value):
    """A field of ``keys show`` in words: an unset limit is ``unlimited``."""
    if value is None:
        return "unlimited" if field in apikeys.LIMITS else "none"
    return value


@keys.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def keys_show(name, as_json):
    """Show key NAME: operator or not, share, quotas, created and revoked,
    what it has waiting now and the tokens it used this period."""
    with key_transaction() as session:
        shown = quotas.describe_key(session, name)
    if as_json:
        click.echo(json.dumps(shown))
        return
    for field, value in shown.items():
        click.echo(f"{field + ':':<22}{describe_value(field, value)}")


@keys.command("revoke")
@click.argument("name")
@click.option("--cancel-work/--keep-work", default=False, show_default=True,
              help="Also cancel its unfinished jobs and batches; by default they run to their end "
                   "(an operator key can still read them). Revoking again with --cancel-work cancels them later.")
def keys_revoke(name, cancel_work):
    """Revoke key NAME: every web process refuses it within a fraction of a second."""
    with key_transaction() as session:
        revoked = apikeys.revoke_api_key(session, name, cancel_work)
    work = (f"cancelled {revoked.cancelled_jobs} jobs and {revoked.cancelled_batches} batches" if cancel_work
            else "its unfinished work runs on (--cancel-work cancels it)")
    click.echo(f"key {revoked.name!r} revoked at {revoked.revoked_at.isoformat()}; {work}")
