"""``queue-engine autoscale``: every ``interval`` seconds, for each model
with a ``[models.X.slurm]`` table, read its backlog and its worker jobs,
decide (``queue_engine.scaling``) and submit or stop jobs.

SLURM is the truth about which jobs exist; the database keeps what we know
of each (``queue_engine.allocations``) and the last decision, for
``GET /api/v1/models``. Jobs are found by name and comment, so an
autoscaler that restarts adopts the jobs its predecessor left instead of
submitting more.
"""

import logging
import threading
import time
from pathlib import Path

from queue_engine import allocations, load, scaling
from queue_engine.db import transaction
from queue_engine.models import utcnow

from .commands import SlurmError
from .jobscript import job_comment, job_name, output_path, render

log = logging.getLogger(__name__)


class Autoscaler:
    """Scales the worker jobs of every model that has a SLURM profile.

    Args:
        settings: the service's settings.
        sessions: a database session factory.
        slurm: a :class:`~slurm.commands.Slurm` client.
    """

    def __init__(self, settings, sessions, slurm):
        self.settings = settings
        self.sessions = sessions
        self.slurm = slurm
        self.deployment = settings.autoscaler.deployment
        self.models = {name: p.slurm for name, p in settings.models.items() if p.slurm is not None}
        #: ``{SLURM job name: model}``: how this deployment's jobs are found.
        self.job_names = {job_name(self.deployment, model): model for model in self.models}

    def run(self, stop=None):
        """Decide every ``interval`` seconds until ``stop`` (an Event) is set."""
        stop = stop or threading.Event()
        interval = self.settings.autoscaler.interval
        log.info("autoscaling %s for deployment %r every %g s", ", ".join(self.models) or "no models",
                 self.deployment, interval)
        while not stop.is_set():
            started = time.monotonic()
            try:
                self.step()
            except Exception:
                log.exception("scaling step failed; trying again in %g s", interval)
            stop.wait(max(0.0, interval - (time.monotonic() - started)))

    def step(self):
        """One round: read SLURM once, then decide and act for each model."""
        try:
            found = self.slurm.jobs(list(self.job_names))
        except SlurmError as e:
            self.record_blind(f"cannot read SLURM's queue: {e}")
            raise
        jobs = {}
        for job in found:
            if job.comment in ("", job_comment(self.deployment, self.job_names[job.name])):
                jobs.setdefault(self.job_names[job.name], {})[job.job_id] = job
        for model in self.models:
            self.scale(model, jobs.get(model, {}))

    def record_blind(self, why):
        """Say in every model's standing why no decision could be made."""
        with transaction(self.sessions) as session:
            for model in self.models:
                state = allocations.scaling_state(session, self.deployment, model)
                state.action, state.reason, state.decided_at = "wait", why, utcnow()

    def scale(self, model, slurm_jobs):
        """Sync ``model``'s allocations with ``slurm_jobs``, decide, act, record."""
        slurm_profile = self.models[model]
        with transaction(self.sessions) as session:
            now = utcnow()
            state = allocations.scaling_state(session, self.deployment, model)
            active = self.sync(session, model, slurm_jobs, state)
            backlog = load.read_backlog(session, [model])["backlog"]
            state.idle_since = (state.idle_since or now) if backlog == 0 else None
            workers = [a for a in active if a.state != "stopping"]
            retry_in = (state.retry_at - now).total_seconds() if state.retry_at else 0.0
            decision = scaling.decide(
                backlog, len(workers), slurm_profile,
                idle_for=(now - state.idle_since).total_seconds() if state.idle_since else None,
                idle_grace=self.settings.autoscaler.idle_grace, failures=state.failures, retry_in=retry_in,
                unproven=sum(1 for a in workers if a.state != "serving"))
            if decision.action == "up":
                self.submit(session, model, decision.change, state)
            elif decision.action == "down":
                self.stop(workers, decision.change)
            quiet = decision.action == state.action == "hold"  # say each change, not each reading
            log.log(logging.DEBUG if quiet else logging.INFO, "%s: %s: %s", model, decision.action, decision.reason)
            state.backlog, state.desired = backlog, decision.desired
            state.action, state.reason, state.decided_at = decision.action, decision.reason, now

    def sync(self, session, model, slurm_jobs, state):
        """Bring the database up to what SLURM says: adopt unknown jobs,
        note starts, close the jobs that left the queue and count failures.

        Returns:
            The model's allocations still in SLURM's queue.
        """
        known = {a.slurm_job_id: a for a in allocations.active(session, self.deployment, model)}
        for job_id, job in slurm_jobs.items():
            if job_id not in known:
                log.info("%s: adopting SLURM job %s (%s)", model, job_id, job.state)
                known[job_id] = allocations.record_submitted(session, self.deployment, model, job_id, adopted=True)
            allocations.observe(known[job_id], job.kind, job.state, job.node)
        for job_id, allocation in known.items():
            if job_id not in slurm_jobs:
                self.close(allocation, state)
            elif state.failures and allocations.served_long_enough(allocation):
                allocations.clear_failures(state)
        return [allocation for job_id, allocation in known.items() if job_id in slurm_jobs]

    def close(self, allocation, state):
        ended = self.slurm.ended(allocation.slurm_job_id)
        if ended is None:
            allocations.close(allocation, "lost", None, "SLURM no longer knows this job")
        else:
            reason = f"{ended.state} (exit {ended.exit_code or '?'})" + (f": {ended.reason}" if ended.reason else "")
            allocations.close(allocation, ended.kind, ended.state, reason)
        log.info("%s: worker job %s ended %s: %s", allocation.model, allocation.slurm_job_id, allocation.state,
                 allocation.exit_reason)
        if allocations.failed_to_start(allocation):
            self.count_failure(state, f"job {allocation.slurm_job_id} ended {allocation.exit_reason} "
                                      f"{'before' if allocation.serving_at is None else 'soon after'} serving")
        elif allocation.serving_at is not None:
            allocations.clear_failures(state)

    def submit(self, session, model, count, state):
        script = render(self.settings, model)
        output_dir = Path(output_path(self.settings, model)).parent
        if "%" not in str(output_dir):  # SLURM does not create it, and a job without it fails at once
            output_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(count):
            try:
                job_id = self.slurm.submit(script)
            except SlurmError as e:
                self.count_failure(state, str(e))
                return
            allocations.record_submitted(session, self.deployment, model, job_id)
            log.info("%s: submitted worker job %s", model, job_id)

    def stop(self, workers, count):
        """Stop ``count`` workers: jobs that are not serving yet are cancelled
        outright, serving ones get SIGTERM (a warm shutdown)."""
        order = {"pending": 0, "starting": 1, "serving": 2}
        chosen = sorted(workers, key=lambda a: (order[a.state], -a.id))[:count]
        cold = [a.slurm_job_id for a in chosen if a.state != "serving"]
        warm = [a.slurm_job_id for a in chosen if a.state == "serving"]
        self.slurm.cancel(cold)
        self.slurm.cancel(warm, signal="TERM")
        for allocation in chosen:
            allocations.request_stop(allocation)

    def count_failure(self, state, why):
        settings = self.settings.autoscaler
        delay = scaling.backoff_delay(state.failures + 1, settings.backoff, settings.max_backoff)
        allocations.count_failure(state, why, delay, settings.error_after)
        level = logging.ERROR if state.state == "error" else logging.WARNING
        log.log(level, "%s: %s; failure %d in a row, %s, next try in %g s", state.model, why, state.failures,
                "ERROR STATE" if state.state == "error" else "backing off", delay)
