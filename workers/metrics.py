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
ENGINE_BUSY = Counter(
    "qe_engine_busy_seconds_total",
    "Seconds the engine spent in steps (the sum of step times; finished requests' engine_seconds split it)")

WEBHOOK_ATTEMPTS = Counter(
    "qe_webhook_attempts_total",
    "Webhook delivery attempts, by what the event became: delivered, pending (a retry is due later) or failed",
    ["result"],
)

DISPATCHED = Counter(
    "qe_dispatcher_messages_total", "Messages the dispatcher sent, by kind (job, chunk, webhook)", ["kind"])
LOST = Counter(
    "qe_dispatcher_lost_messages_total", "Messages found missing from the broker and sent again, by kind", ["kind"])
BROKER_LOSSES = Counter("qe_dispatcher_broker_losses_total", "Times the broker was found to have lost its data")
RECOVERED = Counter(
    "qe_dispatcher_recovered_total", "Jobs and batch rows whose worker died, by outcome (requeued, failed)", ["outcome"])
