"""The SLURM command-line client: sbatch, squeue, scancel, scontrol, sacct.

Each call runs one command with a timeout. A command that fails or hangs
raises :class:`SlurmError` carrying its stderr; nothing is retried or
swallowed here, the autoscaler decides what a failure means.

Job states are read in SLURM's words and sorted into a few kinds, as Parsl's
SLURM provider does: ``pending``, ``running``, and the ends ``completed``,
``failed``, ``timeout`` and ``cancelled``.
"""

import os
import subprocess
from dataclasses import dataclass

from queue_engine.errors import QueueEngineError

#: SLURM's job states (long names, as squeue %T and sacct print them) by kind.
STATE_KINDS = {
    "PENDING": "pending", "CONFIGURING": "pending", "REQUEUED": "pending", "REQUEUE_FED": "pending",
    "REQUEUE_HOLD": "pending", "RESIZING": "pending", "SUSPENDED": "pending",
    "RUNNING": "running", "COMPLETING": "running", "STAGE_OUT": "running", "SIGNALING": "running",
    "COMPLETED": "completed",
    "FAILED": "failed", "NODE_FAIL": "failed", "BOOT_FAIL": "failed", "OUT_OF_MEMORY": "failed",
    "REVOKED": "failed", "SPECIAL_EXIT": "failed",
    "TIMEOUT": "timeout", "DEADLINE": "timeout", "PREEMPTED": "timeout",
    "CANCELLED": "cancelled",
}
ACTIVE_KINDS = ("pending", "running")

_SQUEUE_FORMAT = "%i|%j|%T|%r|%N|%k"


class SlurmError(QueueEngineError):
    """A SLURM command failed, timed out or could not be run."""

    code = "slurm_error"


def state_kind(state):
    """The kind of a SLURM state; ``CANCELLED by 0`` and ``FAILED+`` forms too.

    >>> state_kind("CANCELLED by 0"), state_kind("OUT_OF_MEMORY"), state_kind("RUNNING")
    ('cancelled', 'failed', 'running')
    """
    word = state.split()[0].rstrip("+") if state else ""
    return STATE_KINDS.get(word, "failed" if word else "unknown")


@dataclass(frozen=True)
class SlurmJob:
    """One job as SLURM reports it."""

    job_id: str
    name: str
    state: str  # SLURM's word, e.g. PENDING, OUT_OF_MEMORY
    reason: str = ""  # why it is pending, or why it ended (squeue %r, scontrol Reason)
    node: str = ""
    comment: str = ""
    exit_code: str = ""  # "code:signal", once it ended

    @property
    def kind(self):
        return state_kind(self.state)

    @property
    def active(self):
        return self.kind in ACTIVE_KINDS


class Slurm:
    """Runs SLURM's commands for one user. ``env`` adds to the environment
    (``SLURM_CONF`` for the local cluster)."""

    def __init__(self, timeout=30.0, env=None):
        self.timeout = timeout
        self.env = env

    def run(self, *args, stdin=None):
        """Run a SLURM command; the finished process, or :class:`SlurmError`."""
        env = {**os.environ, **self.env} if self.env else None
        try:
            done = subprocess.run(args, input=stdin, capture_output=True, text=True, timeout=self.timeout, env=env)
        except FileNotFoundError:
            raise SlurmError(f"{args[0]} is not installed or not on PATH") from None
        except subprocess.TimeoutExpired:
            raise SlurmError(f"{' '.join(args)} did not answer within {self.timeout:g} s") from None
        if done.returncode != 0:
            stderr = done.stderr.strip() or done.stdout.strip() or "(no output)"
            raise SlurmError(f"{' '.join(args[:2])} failed (exit {done.returncode}): {stderr}")
        return done

    def submit(self, script):
        """``sbatch --parsable``: submit ``script`` (its text) and return the job id."""
        out = self.run("sbatch", "--parsable", stdin=script).stdout.strip()
        job_id = out.split(";")[0]  # "id" or "id;cluster"
        if not job_id.isdigit():
            raise SlurmError(f"sbatch answered {out!r}, not a job id")
        return job_id

    def test_submit(self, script):
        """``sbatch --test-only``: check ``script`` without submitting; SLURM's answer."""
        return self.run("sbatch", "--test-only", stdin=script).stderr.strip()

    def jobs(self, names):
        """This user's active jobs whose name is one of ``names`` (``squeue``)."""
        if not names:
            return []
        out = self.run("squeue", "--me", "--noheader", f"--name={','.join(names)}", f"--format={_SQUEUE_FORMAT}").stdout
        jobs = []
        for line in out.splitlines():
            job_id, name, state, reason, node, comment = (line.split("|", 5) + [""] * 6)[:6]
            if job_id.strip():
                jobs.append(SlurmJob(job_id.strip(), name, state, _present(reason), _present(node), _present(comment)))
        return jobs

    def cancel(self, job_ids, signal=None):
        """``scancel``; with ``signal`` (e.g. ``"TERM"``) the batch script gets
        that signal instead, and the job may go on as long as it likes.

        Without ``signal`` the job is cancelled outright, which is also how a
        job that ignores SIGTERM is killed: SLURM sends SIGCONT and SIGTERM
        to every process of every step, the batch step included, then SIGKILL
        to what is left after the cluster's ``KillWait``, and the job ends
        ``CANCELLED``. (``--batch --signal=KILL`` would kill the batch shell
        alone and leave its children running outside the ended job;
        ``--full --signal=KILL`` is handled like a plain cancel. Both seen on
        the local cluster, SLURM 22.05.)
        """
        if not job_ids:
            return
        args = ["scancel"]
        if signal:
            # Without --batch, scancel signals only the job's steps, and a
            # worker runs in the batch step itself.
            args += ["--batch", f"--signal={signal}"]
        try:
            self.run(*args, *job_ids)
        except SlurmError as e:
            # A job that ended meanwhile; plain scancel says nothing for one.
            if "Invalid job id specified" not in str(e):
                raise

    def ended(self, job_id):
        """How a job that left the queue ended: from ``scontrol show job``
        (SLURM keeps it for MinJobAge), else accounting (``sacct``), else the
        job completion log (``sacct -c``). None if no source knows the job.
        """
        for read in (self._scontrol, self._sacct, self._sacct_completions):
            try:
                job = read(job_id)
            except SlurmError:
                continue
            if job is not None:
                return job
        return None

    def _scontrol(self, job_id):
        fields = {}
        for word in self.run("scontrol", "show", "job", "--oneliner", job_id).stdout.split():
            key, _, value = word.partition("=")
            fields.setdefault(key, value)
        if fields.get("JobId") != job_id:
            return None
        return SlurmJob(job_id, fields.get("JobName", ""), fields.get("JobState", ""), _present(fields.get("Reason")),
                        _present(fields.get("NodeList")), _present(fields.get("Comment")), fields.get("ExitCode", ""))

    def _sacct(self, job_id, *options):
        out = self.run("sacct", *options, "--noheader", "--parsable2", "--allocations", f"--jobs={job_id}",
                       "--format=JobID,JobName,State,ExitCode,NodeList").stdout
        for line in out.splitlines():
            fields = line.split("|")
            if len(fields) >= 5 and fields[0] == job_id:
                return SlurmJob(job_id, fields[1], fields[2], node=_present(fields[4]), exit_code=fields[3])
        return None

    def _sacct_completions(self, job_id):
        return self._sacct(job_id, "--completion")


def _present(value):
    """SLURM prints ``(null)`` or ``None`` for a missing value."""
    return "" if value in (None, "(null)", "None", "N/A") else value
