"""queue-engine: batch inference for large language models on SLURM clusters.

This package is the domain shared by every process (web, workers, autoscaler):
settings, the database models, the job life cycle and the queue names. It
knows nothing of Flask, Celery or SLURM.
"""

__version__ = "0.1.0"
