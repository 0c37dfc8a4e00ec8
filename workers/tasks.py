"""The Celery task of the interactive lane: transport only.

A task hands its job to the worker's :class:`~workers.runner.Runner` (a set
of one, claimed and finished together with whatever else arrives at the same
time) and returns once the job's outcome is stored, so its message is
acknowledged after that. What running a job means (the lease, the retry
policy, a tribunal's next steps, the webhook event) is ``queue_engine.leases``.

A message whose job is not queued (a duplicate, a job that is running
elsewhere, ended or was cancelled) runs nothing: claims are conditional. If
this worker dies, its jobs' leases expire and the dispatcher puts them back
in the queue (``queue_engine.recovery``).
"""

from queue_engine import keys


def register_tasks(app):
    app.task(name=keys.RUN_JOB_TASK, bind=True, shared=False)(run_job)


def run_job(task, job_id):
    """Run one job to an outcome stored in the database."""
    task.app.qe_runtime.runner.run(job_ids=[job_id]).result()
