"""One settings object for every process.

Read once at start-up: defaults, then the TOML file named by
``QUEUE_ENGINE_CONFIG``, then ``QUEUE_ENGINE_*`` environment variables, each
overriding the one before. The defaults give the embedded mode (SQLite file,
in-process broker, the built-in ``tiny`` model). Nothing else in the project
reads ``os.environ`` for our settings; the object is passed down.
"""

import os
import re
import tomllib
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from . import prompts, targets
from .errors import SettingsError

ENV_PREFIX = "QUEUE_ENGINE_"

#: The Standard Webhooks retry schedule, in seconds.
STANDARD_WEBHOOK_DELAYS = (5, 300, 1800, 7200, 18000, 36000, 36000)


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


#: A name that goes into SLURM job names, comments and file names as it is.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
#: What each ``#SBATCH`` value may hold. sbatch reads these lines itself, so a
#: space or a newline could smuggle in another option or a shell line.
SBATCH_VALUE_PATTERNS = {
    "mem": r"^\d+[KMGT]?$",
    "time": r"^(\d+-)?\d+(:\d{1,2}){0,2}$",
    "partition": r"^[A-Za-z0-9._,-]+$",
    "account": r"^[A-Za-z0-9._-]+$",
    "qos": r"^[A-Za-z0-9._-]+$",
    "constraint": r"^[A-Za-z0-9._,&|*()\[\]-]+$",
    "output": r"^[A-Za-z0-9._/%+=@,-]+$",
}
EXTRA_LINE_PATTERN = r"^--[A-Za-z][A-Za-z0-9-]*(=[A-Za-z0-9._/%+=@:,*&|\[\]-]+)?$"


class SlurmProfile(_Frozen):
    """How one model's workers are submitted to SLURM (used by ``slurm/``).

    Every value that goes into an ``#SBATCH`` line is checked against a
    pattern, so a profile cannot add options or commands to the job script.
    ``setup`` lines are shell on purpose (modules, a venv, apptainer); each
    must be one line.
    """

    gpus: int = Field(1, ge=0, description="GPUs per worker job")
    cpus: int = Field(4, ge=1, description="CPUs per worker job")
    mem: str = Field("16G", description="memory per worker job, SLURM syntax")
    time: str = Field("04:00:00", description="walltime per worker job")
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    output: str | None = Field(None, description="the job's output file (default data_dir/slurm/%x-%j.out)")
    extra: list[str] = Field(default_factory=list, description="extra #SBATCH lines, e.g. --exclusive")
    setup: list[str] = Field(default_factory=list, description="shell lines before the worker starts")
    stop_before_end: int = Field(
        300, ge=0, description="seconds before the walltime when the worker is told to stop taking work")
    min_workers: int = Field(0, ge=0)
    max_workers: int = Field(4, ge=0)
    target_backlog_per_worker: int = Field(256, ge=1)

    @field_validator(*SBATCH_VALUE_PATTERNS)
    @classmethod
    def _sbatch_value(cls, value, info):
        if value is not None and not re.fullmatch(SBATCH_VALUE_PATTERNS[info.field_name], value):
            raise ValueError(f"{value!r} is not a valid value for #SBATCH --{info.field_name}")
        return value

    @field_validator("extra")
    @classmethod
    def _extra_lines(cls, lines):
        for line in lines:
            if not re.fullmatch(EXTRA_LINE_PATTERN, line):
                raise ValueError(f"{line!r} is not one sbatch option (--name or --name=value, no spaces)")
        return lines

    @field_validator("setup")
    @classmethod
    def _one_line_each(cls, lines):
        for line in lines:
            if any(ord(c) < 32 and c != "\t" or ord(c) == 127 for c in line):
                raise ValueError(f"setup line {line!r} holds a newline or a control character")
        return lines

    @model_validator(mode="after")
    def _min_within_max(self):
        if self.min_workers > self.max_workers:
            raise ValueError(f"min_workers ({self.min_workers}) is above max_workers ({self.max_workers})")
        return self


class ModelProfile(_Frozen):
    """A model that workers can serve: where it is and how to run it."""

    path: str = Field("tiny", description='a Hugging Face model directory, or "tiny" / "tiny-large" for the built-in model')
    engine_args: dict = Field(default_factory=dict, description="passed to vLLM's EngineArgs")
    max_in_flight: int = Field(256, ge=1, le=4096, description="concurrent requests one worker feeds its engine")
    bulk_seats_with_interactive: int = Field(
        4, ge=0,
        description="bulk rows that keep running while interactive requests are in the engine (the others pause, "
                    "keeping their tokens, and resume when interactive work ends), so interactive steps stay "
                    "near their idle time; max_in_flight or more: no bound, bulk always fills the engine")
    slurm: SlurmProfile | None = None

    @property
    def max_model_len(self):
        """The context length the engine is told to use (prompt plus output)."""
        return int(self.engine_args.get("max_model_len", 512))


class TribunalSettings(_Frozen):
    """When a tribunal runs as a single pass, and the prompts of its steps."""

    bypass_backlog: int = Field(
        500, ge=0, description="with bypass auto, run a single pass when the backlog (requests) is above this")
    max_candidates: int = Field(8, ge=1, le=32, description="most candidate answers one tribunal may ask for")
    answer_template: str = Field(prompts.ANSWER_TEMPLATE, description="how each candidate answer is shown")
    critique_template: str = Field(prompts.CRITIQUE_TEMPLATE, description="the judge's prompt")
    revision_template: str = Field(prompts.REVISION_TEMPLATE, description="the reviser's prompt")

    @field_validator("answer_template", "critique_template", "revision_template")
    @classmethod
    def _usable_template(cls, template, info):
        return prompts.check_template(info.field_name, template)


class BatchSettings(_Frozen):
    """Limits on uploaded files and how their rows are sent to workers."""

    max_bytes: int = Field(200 * 1024 * 1024, ge=1024, description="largest file accepted")
    max_rows: int = Field(1_000_000, ge=1, description="most rows in one file")
    max_prompt_chars: int = Field(100_000, ge=1, description="a longer prompt fails its row")
    chunk_rows: int = Field(64, ge=1, le=4096, description="rows per bulk-lane message")
    completion_windows: tuple[str, ...] = Field(
        ("24h",), description="the completion_window values /v1 batches accept: durations such as 2s, 1h, 24h, 7d")


class FileSettings(_Frozen):
    """Limits on files uploaded through the OpenAI-compatible ``/v1/files``."""

    max_bytes: int = Field(200 * 1024 * 1024, ge=1024, description="largest file accepted (OpenAI's limit: 200 MB)")


class OpenAISettings(_Frozen):
    """The OpenAI-compatible ``/v1/chat/completions`` and ``/v1/completions``."""

    queue_timeout_seconds: float = Field(
        600.0, gt=0, description="how long a request waits for a worker to start it (the autoscaler may be starting "
                                 "one) before it is cancelled and answered 503")
    retry_after_seconds: int = Field(30, ge=1, description="the Retry-After of that 503, seconds")


class AutoscalerSettings(_Frozen):
    """How ``queue-engine autoscale`` decides (see ``queue_engine/scaling.py``)."""

    interval: float = Field(5.0, gt=0, description="seconds between scaling decisions")
    idle_grace: float = Field(120.0, ge=0, description="idle seconds before scale-in")
    deployment: str = Field(
        "main", pattern=NAME_PATTERN,
        description="names this service's SLURM jobs (qe-<deployment>-<model>), so several can share a cluster")
    backoff: float = Field(10.0, gt=0, description="seconds before replacing a worker job that failed to start")
    max_backoff: float = Field(600.0, gt=0, description="the back-off doubles per failure up to this")
    error_after: int = Field(3, ge=1, description="failures in a row that put a profile in the error state")
    command_timeout: float = Field(30.0, gt=0, description="seconds before a SLURM command counts as failed")
    leader_ttl: float = Field(
        15.0, gt=0,
        description="seconds the leading autoscaler's lease lasts unless renewed (every interval); a standby "
                    "takes over this long after the leader dies, at once after it exits cleanly")
    stop_grace: float = Field(
        600.0, ge=0,
        description="seconds a worker told to stop may keep running (finishing what it holds) before it is "
                    "killed through SLURM")

    @model_validator(mode="after")
    def _lease_outlives_interval(self):
        if self.leader_ttl <= self.interval:
            raise ValueError(f"leader_ttl ({self.leader_ttl:g} s) must be longer than interval ({self.interval:g} s), "
                             "or the leader's lease runs out between its renewals; make it about three intervals")
        return self


class DispatcherSettings(_Frozen):
    """How the dispatcher in ``serve`` keeps the broker in step with the
    database (``queue_engine/dispatch.py``, ``workers/dispatcher.py``)."""

    interval: float = Field(0.25, gt=0, description="seconds between looks for work that needs a message")
    check_interval: float = Field(
        2.0, gt=0,
        description="seconds between checks of the broker (lost data, lost messages) and of expired leases")
    page: int = Field(1000, ge=1, description="most messages one look sends")
    bulk_window: int = Field(
        2, ge=1, le=10000,
        description="the fewest chunks of one model's batch rows the broker holds at once (more while its workers "
                    "take more than that in half a second); the rest wait in the database and go out by fair share between "
                    "keys as workers take these")


def default_data_dir(environ=os.environ):
    """``$XDG_DATA_HOME/queue-engine``, i.e. ``~/.local/share/queue-engine``."""
    base = environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "queue-engine"


def _default_models():
    return {"tiny": ModelProfile(path="tiny", engine_args={"max_model_len": 512, "seed": 0})}


class Settings(_Frozen):
    """Every setting, with its default. See the README for the full table."""

    data_dir: Path = Field(default_factory=default_data_dir, description="SQLite file, built models, uploads")
    database_url: str | None = Field(None, description="SQLAlchemy URL; default a SQLite file in data_dir")
    broker_url: str | None = Field(None, description="redis://... for cluster mode; unset = embedded")
    webhook_allow: list[str] = Field(default_factory=list, description="CIDRs webhook targets may resolve into")
    webhook_retry_delays: list[float] = Field(
        default_factory=lambda: list(STANDARD_WEBHOOK_DELAYS), max_length=50,
        description="seconds before each retry of a webhook; after the last, the event fails")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="largest JSON request body accepted")
    max_attempts: int = Field(3, ge=1, description="tries per job before it fails")
    lease_seconds: float = Field(60.0, gt=0, description="a running job's lease; renewed by its worker")
    visibility_timeout: float = Field(
        3600.0, gt=0,
        description="seconds before Redis hands out an unacknowledged message again; recovery does not wait for it "
                    "(the dispatcher re-sends a dead worker's work once its lease expires)",
    )
    database_retry_seconds: float = Field(
        300.0, gt=0,
        description="how long a worker keeps retrying a write it must not lose (a finished generation) "
                    "while the database is unreachable")
    retry_delay: float = Field(2.0, ge=0, description="seconds before a failed engine call is retried")
    max_wait: float = Field(30.0, ge=0, le=3600, description="the longest long-poll (?wait=) a GET may ask for, seconds")
    wait_interval: float = Field(
        0.15, gt=0, le=10, description="seconds between a web process's looks for waited-on items that ended")
    api_key_cache_seconds: float = Field(
        5.0, ge=0, description="how long a web process trusts an API key it looked up; a revocation or new limits "
                              "still reach it within 0.2 s (apikeys.ApiKeyCache)")
    web_threads: int = Field(
        64, ge=1, le=10000,
        description="request threads per web process; a long-poll holds one while it waits")
    secret_key: str | None = Field(
        None, description="signs the dashboard's session cookies; default a random key kept in data_dir/secret_key "
                          "(set the same one on every web host of a deployment)")
    secure_cookies: bool = Field(
        True, description="the dashboard's session cookie goes over HTTPS only (browsers count http://localhost and "
                          "127.0.0.1 as secure); false to sign in over plain HTTP from another machine")
    batches: BatchSettings = Field(default_factory=BatchSettings)
    files: FileSettings = Field(default_factory=FileSettings)
    openai: OpenAISettings = Field(default_factory=OpenAISettings)
    tribunal: TribunalSettings = Field(default_factory=TribunalSettings)
    autoscaler: AutoscalerSettings = Field(default_factory=AutoscalerSettings)
    dispatcher: DispatcherSettings = Field(default_factory=DispatcherSettings)
    faults: list[str] = Field(
        default_factory=list,
        description="for tests only: named points (e.g. after_commit) where the process kills itself")
    models: dict[str, ModelProfile] = Field(default_factory=_default_models)

    @field_validator("models")
    @classmethod
    def _keep_tiny(cls, models):
        """The ``tiny`` profile exists unless the configuration overrides it.

        Names become queue names and SLURM job names, so they are plain words.
        """
        for name in models:
            if not re.fullmatch(NAME_PATTERN, name):
                raise ValueError(f"model profile name {name!r}: use letters, digits, '.', '_' and '-' (64 at most)")
        return {**_default_models(), **models}

    @field_validator("webhook_allow")
    @classmethod
    def _networks(cls, cidrs):
        targets.allowed_networks(cidrs)
        return cidrs

    @field_validator("webhook_retry_delays")
    @classmethod
    def _delays(cls, delays):
        if any(delay < 0 for delay in delays):
            raise ValueError("delays are seconds, 0 or more")
        return delays

    @property
    def webhook_networks(self):
        """``webhook_allow`` as ``ipaddress`` networks."""
        return targets.allowed_networks(self.webhook_allow)

    @property
    def is_embedded(self):
        """True when no broker is configured: ``serve`` runs a worker inside."""
        return not self.broker_url

    @property
    def sqlalchemy_url(self):
        return self.database_url or f"sqlite:///{self.data_dir / 'queue-engine.db'}"

    @property
    def models_dir(self):
        return self.data_dir / "models"

    @property
    def files_dir(self):
        """Where ``/v1/files`` uploads are kept, one file per id."""
        return self.data_dir / "files"

    def profile(self, name):
        """The model profile called ``name``.

        Raises:
            SettingsError: no such profile is configured.
        """
        try:
            return self.models[name]
        except KeyError:
            raise SettingsError(
                f"no model profile {name!r}; configured: {', '.join(sorted(self.models))}"
            ) from None


#: Environment variables holding lists, as comma-separated text.
_LIST_FIELDS = {"webhook_allow", "webhook_retry_delays", "faults"}
#: Top-level fields that cannot be set from the environment (tables).
_TABLE_FIELDS = {"batches", "files", "tribunal", "autoscaler", "dispatcher", "models"}


def load_settings(environ=None, **overrides):
    """Build :class:`Settings` from the TOML file and the environment.

    Args:
        environ: the environment to read (default ``os.environ``).
        **overrides: values that win over both (used by tests and the CLI).

    Raises:
        SettingsError: the file is missing or malformed, or a value is invalid.
    """
    environ = os.environ if environ is None else environ
    values = {}
    config_path = environ.get(ENV_PREFIX + "CONFIG")
    if config_path:
        values.update(_read_toml(config_path))
    values.update(_read_env(environ))
    values.setdefault("data_dir", default_data_dir(environ))
    values.update(overrides)
    try:
        return Settings(**values)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()
        )
        source = f" (config file {config_path!r})" if config_path else ""
        raise SettingsError(f"invalid settings{source}: {problems}") from e


def _read_toml(path):
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise SettingsError(f"QUEUE_ENGINE_CONFIG names {path!r}, which does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise SettingsError(f"cannot parse the config file {path!r}: {e}") from e


def _read_env(environ):
    values = {}
    for name in Settings.model_fields:
        if name in _TABLE_FIELDS:
            continue
        raw = environ.get(ENV_PREFIX + name.upper())
        if raw is None:
            continue
        if name in _LIST_FIELDS:
            values[name] = [item.strip() for item in raw.split(",") if item.strip()]
        else:
            values[name] = raw
    return values
