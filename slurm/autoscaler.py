"""``queue-engine autoscale``: every ``interval`` seconds, for each model
with a ``[models.X.slurm]`` table, read its backlog and its worker jobs,
decide (``queue_engine.scaling``) and submit or stop jobs.

SLURM is the truth about which jobs exist; the database keeps what we know
of each (``queue_engine.allocations``) and the last decision, for
``GET /api/v1/models``. Jobs are found by name and comment, so an
autoscaler that restarts adopts the jobs its predecessor left instead of
submitting more.

Several autoscalers may run for one deployment (on two login nodes, say):
only the holder of the lease ``autoscaler:<deployment>``
(``queue_engine.leadership``) reads SLURM and acts; the others stand by,
trying every ``interval``, and take over once the lease runs out
(``leader_ttl`` after the leader's last renewal; at their next try when
it exits cleanly and releases it).

A step may last longer than ``leader_ttl`` (an ``sbatch`` that hangs until
``command_timeout``, several of them). That does not let a standby act
alongside: each model's round renews the lease at the start of its
transaction, and that renewal locks the lease row until the transaction
commits (PostgreSQL's row lock; SQLite's single writer), so a standby's
attempt waits for the round to end and then sees the renewed lease. Only
once the round is committed, every job it submitted recorded, can the lease
change hands. The round renews again just before it commits, so a long one
keeps its lease. A renewal is never a takeover: if another autoscaler took
the lease since this one's round began, the renewal fails and this one
stops acting for the rest of the step.
"""

import logging
import threading
import time
from collections import Counter
from pathlib import Path

from queue_engine import allocations, leadership, load, metrics, scaling
from queue_engine.allocations import AllocationState, ScalingHealth
from queue_engine.db import transaction
from queue_engine.metrics import DECISIONS, DESIRED, LEADING, WORKERS
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
        holder: who this autoscaler is in the lease (default ``host:pid:random``).
    """

    def __init__(self, settings, sessions, slurm, holder=None):
        self.settings = settings
        self.sessions = sessions
        self.slurm = slurm
        self.deployment = settings.autoscaler.deployment
        self.models = {name: p.slurm for name, p in settings.models.items() if p.slurm is not None}
        #: ``{SLURM job name: model}``: how this deployment's jobs are found.
        self.job_names = {job_name(self.deployment, model): model for model in self.models}
        self.holder = holder or leadership.new_holder_id()
        self.lease = leadership.autoscaler_lease(self.deployment)
        self.leading = False
        self._standing_by_for = None  # the holder last named in a "standing by" line
        metrics.initialize(settings, "autoscaler", list(self.models))

    def run(self, stop=None):
        """Decide every ``interval`` seconds until ``stop`` (an Event) is set,
        then release the lease so that a standby takes over at once."""
        stop = stop or threading.Event()
        interval = self.settings.autoscaler.interval
        log.info("autoscaling %s for deployment %r every %g s as %s", ", ".join(self.models) or "no models",
                 self.deployment, interval, self.holder)
        try:
            while not stop.is_set():
                started = time.monotonic()
                try:
                    self.step()
                except Exception:
                    log.exception("scaling step failed; trying again in %g s", interval)
                stop.wait(max(0.0, interval - (time.monotonic() - started)))
        finally:
            self.release()

    def step(self):
        """One round, if this autoscaler leads: read SLURM once, then decide
        and act for each model.

        Returns:
            True if it led the round, False if another autoscaler holds the
            lease (nothing was read or done) or took it during the round.
        """
        if not self.lead():
            return False
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
            if not self.scale(model, jobs.get(model, {})):
                log.warning("lost the lease %r to another autoscaler during a step; standing by", self.lease)
                self.leading = False
                return False
        return True

    def lead(self):
        """Take or renew the deployment's lease. Says when this autoscaler
        starts leading, and once per leader that it stands by for which."""
        with transaction(self.sessions) as session:
            leading = leadership.acquire(session, self.lease, self.holder, self.settings.autoscaler.leader_ttl)
            other = None if leading else leadership.read_holder(session, self.lease)
        if leading and not self.leading:
            log.info("leading deployment %r: took the lease %r", self.deployment, self.lease)
            self._standing_by_for = None
        elif other is not None and other.holder != self._standing_by_for:
            log.info("standing by: %s leads deployment %r (lease %r until %s)", other.holder, self.deployment,
                     self.lease, other.expires_at.isoformat(timespec="seconds"))
            self._standing_by_for = other.holder
        self.leading = leading
        self.show_leading(leading)
        return leading

    def show_leading(self, leading):
        """The metrics of leading; a standby shows no workers, so the leader's are not counted twice."""
        LEADING.labels(self.deployment).set(1 if leading else 0)
        if not leading:
            WORKERS.clear()
            DESIRED.clear()

    def release(self):
        """Give the lease up (a clean exit), so that a standby need not wait for it to run out."""
        try:
            with transaction(self.sessions) as session:
                released = leadership.release(session, self.lease, self.holder)
        except Exception:
            log.exception("could not release the lease %r; a standby takes over when it runs out", self.lease)
            return
        self.leading = False
        self.show_leading(False)
        if released:
            log.info("released the lease %r", self.lease)

    def record_blind(self, why):
        """Say in every model's standing why no decision could be made."""
        with transaction(self.sessions) as session:
            if not leadership.renew(session, self.lease, self.holder, self.settings.autoscaler.leader_ttl):
                return
            for model in self.models:
                state = allocations.scaling_state(session, self.deployment, model)
                state.action, state.reason, state.decided_at = "wait", why, utcnow()

    def scale(self, model, slurm_jobs):
        """Sync ``model``'s allocations with ``slurm_jobs``, kill workers that
        did not stop, decide, act, record; all under the lease (see above).

        Returns:
            False, having done nothing, if this autoscaler no longer holds the lease.
        """
        slurm_profile = self.models[model]
        ttl = self.settings.autoscaler.leader_ttl
        with transaction(self.sessions) as session:
            if not leadership.renew(session, self.lease, self.holder, ttl):
                return False
            now = utcnow()
            state = allocations.scaling_state(session, self.deployment, model)
            active = self.sync(session, model, slurm_jobs, state)
            self.kill_overdue(model, active, now)
            backlog = load.read_backlog(session, [model])["backlog"]
            state.idle_since = (state.idle_since or now) if backlog == 0 else None
            workers = [a for a in active if a.state != AllocationState.STOPPING]
            retry_in = (state.retry_at - now).total_seconds() if state.retry_at else 0.0
            decision = scaling.decide(
                backlog, len(workers), slurm_profile,
                idle_for=(now - state.idle_since).total_seconds() if state.idle_since else None,
                idle_grace=self.settings.autoscaler.idle_grace, failures=state.failures, retry_in=retry_in,
                unproven=sum(1 for a in workers if a.state != AllocationState.SERVING))
            if decision.action == "up":
                self.submit(session, model, decision.change, state)
            elif decision.action == "down":
                self.stop(workers, decision.change)
            quiet = decision.action == state.action == "hold"  # say each change, not each reading
            log.log(logging.DEBUG if quiet else logging.INFO, "%s: %s: %s", model, decision.action, decision.reason)
            state.backlog, state.desired = backlog, decision.desired
            state.action, state.reason, state.decided_at = decision.action, decision.reason, now
            states = Counter(a.state for a in allocations.active(session, self.deployment, model))
            leadership.renew(session, self.lease, self.holder, ttl)  # from now: a long round keeps its lease
        self.count_decision(model, decision, states)
        return True

    def count_decision(self, model, decision, states):
        """The metrics of a committed round: its decision, and the model's
        worker jobs by state (``states``: ``{state: count}``) after it acted."""
        DECISIONS.labels(self.deployment, model, decision.action).inc()
        DESIRED.labels(self.deployment, model).set(decision.desired)
        for state in allocations.ACTIVE_STATES:
            WORKERS.labels(self.deployment, model, state).set(states.get(state, 0))

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

    def kill_overdue(self, model, active, now):
        """Kill through SLURM (a plain ``scancel``) the workers told to stop
        ``stop_grace`` ago that still run; once each. A ``scancel`` that fails
        is logged and tried again next round."""
        grace = self.settings.autoscaler.stop_grace
        overdue = [a for a in active if allocations.should_kill(a, grace, now)]
        if not overdue:
            return
        try:
            self.slurm.cancel([a.slurm_job_id for a in overdue])
        except SlurmError as e:
            log.error("%s: cannot kill worker jobs %s that did not stop: %s; trying again in the next round", model,
                      ", ".join(a.slurm_job_id for a in overdue), e)
            return
        for allocation in overdue:
            allocations.request_kill(allocation, now)
            log.warning("%s: worker job %s still runs %.0f s after it was told to stop; killed it (scancel)", model,
                        allocation.slurm_job_id, (now - allocation.stop_requested_at).total_seconds())

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
        order = [AllocationState.PENDING, AllocationState.STARTING, AllocationState.SERVING]
        chosen = sorted(workers, key=lambda a: (order.index(a.state), -a.id))[:count]
        cold = [a.slurm_job_id for a in chosen if a.state != AllocationState.SERVING]
        warm = [a.slurm_job_id for a in chosen if a.state == AllocationState.SERVING]
        self.slurm.cancel(cold)
        self.slurm.cancel(warm, signal="TERM")
        for allocation in chosen:
            allocations.request_stop(allocation)

    def count_failure(self, state, why):
        settings = self.settings.autoscaler
        delay = scaling.backoff_delay(state.failures + 1, settings.backoff, settings.max_backoff)
        allocations.count_failure(state, why, delay, settings.error_after)
        level = logging.ERROR if state.state == ScalingHealth.ERROR else logging.WARNING
        log.log(level, "%s: %s; failure %d in a row, %s, next try in %g s", state.model, why, state.failures,
                "ERROR STATE" if state.state == ScalingHealth.ERROR else "backing off", delay)
