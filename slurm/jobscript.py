"""The batch script of a worker job, rendered from a model's SLURM profile.

The template is ``slurm/templates/worker.sh.j2``. Every value in it was
checked when the settings were read (``SlurmProfile`` in
``queue_engine/settings.py``); :func:`render` checks once more that nothing
it writes can end a line (the default output path holds ``data_dir``), so a
profile cannot add commands to the script.
"""

import re

import jinja2

from queue_engine.errors import SettingsError

_templates = jinja2.Environment(
    loader=jinja2.PackageLoader("slurm", "templates"),
    undefined=jinja2.StrictUndefined,
    keep_trailing_newline=True,
    autoescape=False,  # a shell script, not HTML; values are validated instead
)


def job_name(deployment, model):
    """The name every worker job of ``model`` in ``deployment`` carries.

    >>> job_name("main", "tiny")
    'qe-main-tiny'
    """
    return f"qe-{deployment}-{model}"


def job_comment(deployment, model):
    """The ``--comment`` tag that marks a job as ours (``squeue -o %k``).

    >>> job_comment("main", "tiny")
    'queue-engine:main:tiny'
    """
    return f"queue-engine:{deployment}:{model}"


def output_path(settings, model):
    """Where a job's output goes: the profile's ``output``, else
    ``data_dir/slurm/<job name>-<job id>.out``."""
    return settings.profile(model).slurm.output or str(settings.data_dir / "slurm" / "%x-%j.out")


def render(settings, model):
    """The job script that runs ``queue-engine worker --model MODEL``.

    Raises:
        SettingsError: ``model`` has no ``[models.MODEL.slurm]`` table, or a
            value could break out of its line.
    """
    profile = settings.profile(model)
    if profile.slurm is None:
        raise SettingsError(f"model profile {model!r} has no [models.{model}.slurm] table; it cannot scale out")
    deployment = settings.autoscaler.deployment  # names were checked with the settings
    output = output_path(settings, model)
    if not re.fullmatch(r"[^\s'\"`$;&|<>\\]+", output):  # the default holds data_dir, which is not checked
        raise SettingsError(f"output path {output!r} holds spaces or shell metacharacters")
    return _templates.get_template("worker.sh.j2").render(
        model=model,
        deployment=deployment,
        job_name=job_name(deployment, model),
        comment=job_comment(deployment, model),
        output=output,
        slurm=profile.slurm,
    )
