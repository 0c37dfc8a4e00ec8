"""Celery workers: the app, its tasks, the inference engine and the loop that feeds it."""
