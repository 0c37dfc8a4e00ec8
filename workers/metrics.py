"""Prometheus metrics a worker exposes (``queue-engine worker --metrics-port``)."""

from prometheus_client import Counter, Gauge, Histogram

BATCH_SIZE = Histogram(
    "qe_engine_batch_size",
    "Requests in the engine batch at each step",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
)
IN_FLIGHT = Gauge("qe_engine_in_flight", "Requests the engine loop holds")
REQUESTS = Counter("qe_engine_requests_total", "Requests the engine loop finished, by outcome", ["outcome"])
BULK_WAITING = Gauge("qe_engine_bulk_waiting", "bulk rows waiting in the worker for a seat in the engine")

WEBHOOK_ATTEMPTS = Counter(
    "qe_webhook_attempts_total",
    "Webhook delivery attempts, by what the event became: delivered, pending (a retry is due later) or failed",
    ["result"],
)
