"""How many workers a model should have, and why: the autoscaler's policy.

Pure functions of what was read (backlog, workers, failures); the loop that
reads SLURM and the queues and acts is ``slurm/autoscaler.py``.

- desired = clamp(ceil(backlog / target_backlog_per_worker), min, max)
- Scale up at once: pending jobs count as workers, so a job waiting in
  SLURM's queue is not submitted twice.
- Scale down only once the backlog has been zero for ``idle_grace``; while
  any request waits or runs, workers stay.
- After a worker job failed to start, replacements go one at a time: after
  a back-off that doubles with each failure in a row, and only once no other
  job is still on its way up (pending or starting).
"""

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Decision:
    """What to do for one model now. ``action`` is ``up`` (submit
    ``change`` jobs), ``down`` (stop ``change`` workers), ``hold`` or ``wait``
    (more are wanted, but a back-off is running)."""

    action: str
    desired: int
    reason: str
    change: int = 0


def desired_workers(backlog, slurm):
    """Workers wanted for ``backlog`` requests under the profile ``slurm``.

    >>> from queue_engine.settings import SlurmProfile
    >>> desired_workers(600, SlurmProfile(max_workers=2, target_backlog_per_worker=256))
    2
    >>> desired_workers(0, SlurmProfile(min_workers=1))
    1
    """
    wanted = math.ceil(backlog / slurm.target_backlog_per_worker)
    return max(slurm.min_workers, min(slurm.max_workers, wanted))


def decide(backlog, workers, slurm, idle_for, idle_grace, failures=0, retry_in=0.0, unproven=0):
    """The decision for one model.

    Args:
        backlog: requests waiting or running in both lanes.
        workers: its worker jobs that count: pending, starting or serving
            (not those already told to stop).
        slurm: the model's ``SlurmProfile``.
        idle_for: seconds the backlog has been zero, None if it is not.
        idle_grace: idle seconds before scale-in.
        failures: worker jobs in a row that failed to start.
        retry_in: seconds left of the back-off (0 when none runs).
        unproven: of ``workers``, those not serving yet (pending or starting).
    """
    desired = desired_workers(backlog, slurm)
    if desired > workers:
        return _scale_up(backlog, workers, desired, slurm, failures, retry_in, unproven)
    if desired < workers:
        if backlog > 0:
            return Decision("hold", desired, f"{backlog} requests still waiting or running; keeping {workers} workers")
        if idle_for is None or idle_for < idle_grace:
            waited = 0 if idle_for is None else idle_for
            return Decision("hold", desired,
                            f"idle for {waited:.0f} s of the {idle_grace:g} s grace; keeping {workers} workers")
        return Decision("down", desired, f"idle for {idle_for:.0f} s: stopping {workers - desired} of {workers} "
                        f"workers (min_workers {slurm.min_workers})", workers - desired)
    return Decision("hold", desired, f"{workers} workers for a backlog of {backlog}")


def _scale_up(backlog, workers, desired, slurm, failures, retry_in, unproven):
    wanted = (f"backlog {backlog} at {slurm.target_backlog_per_worker} per worker wants {desired} "
              f"(min {slurm.min_workers}, max {slurm.max_workers}), {workers} running or pending")
    if failures and retry_in > 0:
        return Decision("wait", desired, f"{wanted}; backing off after {failures} failed starts, "
                        f"next try in {retry_in:.0f} s")
    if failures and unproven:
        return Decision("wait", desired, f"{wanted}; after {failures} failed starts, waiting for the "
                        f"{unproven} starting to serve before submitting more")
    change = 1 if failures else desired - workers  # after a failure, one at a time
    return Decision("up", desired, f"{wanted}: submitting {change}", change)


def backoff_delay(failures, base, cap):
    """Seconds before the next try after ``failures`` failed starts in a row.

    >>> [backoff_delay(n, 10, 60) for n in range(5)]
    [0, 10, 20, 40, 60]
    """
    return 0 if failures <= 0 else min(cap, base * 2 ** (failures - 1))
