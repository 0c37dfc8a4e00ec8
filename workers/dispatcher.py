"""The dispatcher: a thread in ``serve`` that keeps the broker in step with
the database, the queue of record.

Every ``dispatcher.interval`` seconds it sends what waits unsent in the
database: jobs and chunks that were never sent (a crash between commit and
send, a broker that was down when they were submitted), retries whose delay
has passed, work put back in the queue, and due webhook events. Every
``dispatcher.check_interval`` seconds it also checks:

- that the broker still holds the marker key it keeps there; when the key is
  gone the broker lost its data, and everything it held is sent again;
- that the broker holds as many messages per queue as the database says were
  sent and not yet taken; what is missing for two checks in a row is sent
  again (``queue_engine.dispatch`` explains how it knows which);
- that no running work has a lease that expired: its worker died, and the
  work goes back to the queue (``queue_engine.recovery``).

Several ``serve`` processes may each run one: every claim is a conditional
UPDATE, and a message sent twice is harmless. After the dispatcher could not
reach the database (it restarted, say) it waits one ``lease_seconds`` before
judging leases again, so workers that lost the database too can renew theirs
and store what they finished meanwhile.
"""

import logging
import secrets
import threading
import time

from queue_engine import dispatch, fairshare, keys, openai_batches, recovery, webhooks
from queue_engine.broker import BROKER_ERRORS, send_chunks, send_jobs, send_webhook_events
from queue_engine.db import is_unreachable, transaction
from queue_engine.metrics import BROKER_LOSSES, DISPATCHED, LOST, RECOVERED
from queue_engine.models import utcnow

log = logging.getLogger(__name__)


class Dispatcher:
    """Sends what waits in the database and repairs what the broker lost.

    Args:
        celery_app: the Celery app whose broker it sends to.
        sessions: a database session factory.
        settings: the service's settings.
    """

    def __init__(self, celery_app, sessions, settings):
        self.app, self.sessions, self.settings = celery_app, sessions, settings
        self.deployment = settings.autoscaler.deployment  # the metrics' label
        self.marker = secrets.token_hex(8)
        self._first_check = True
        self._connection = None
        self._suspects = {}
        self._next_check = 0.0
        self._judge_leases_after = time.monotonic() + settings.lease_seconds
        self._failing = None
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dispatcher", daemon=True)

    def start(self):
        self._thread.start()
        return self

    def stop(self):
        self._stopping.set()
        self._thread.join(10)
        self._close_connection()

    def _run(self):
        while not self._stopping.is_set():
            try:
                self.run_once()
                self._recovered()
            except Exception as e:
                self._failed(e)
            self._stopping.wait(self.settings.dispatcher.interval)

    def run_once(self):
        """One round: the checks when they are due, then send what waits."""
        checking = time.monotonic() >= self._next_check
        if checking:
            self._next_check = time.monotonic() + self.settings.dispatcher.check_interval
            self.recover_abandoned()  # needs only the database
            self.expire_batches()
        client = self._broker_client()
        if checking:
            self.check_broker_marker(client)
            self.find_lost_messages()
        self.send_due()

    # --- sending ---------------------------------------------------------------

    def send_due(self):
        """Send every unsent, due job and webhook event, a page of each at a
        time, and fill each model's window of batch chunks (``queue_engine.fairshare``).

        One transaction marks a page of each kind sent; what the broker then
        refuses is marked unsent again, and the round ends (BrokerDownError).
        """
        settings = self.settings
        page, now = settings.dispatcher.page, utcnow()
        while True:
            with transaction(self.sessions) as session:
                claimed = {
                    "job": [tuple(job) for job in dispatch.claim_due_jobs(session, now, page)],
                    "chunk": fairshare.claim_fair_chunks(session, now, settings.dispatcher.bulk_window,
                                                         settings.batches.chunk_rows),
                    "webhook": webhooks.claim_due(session, limit=page, now=now),
                }
            unsent = {
                "job": send_jobs(self.app, claimed["job"]),
                "chunk": send_chunks(self.app, claimed["chunk"]),
                "webhook": send_webhook_events(self.app, claimed["webhook"]),
            }
            for kind, items in claimed.items():
                DISPATCHED.labels(self.deployment, kind).inc(len(items) - len(unsent[kind]))
            if any(unsent.values()):
                with transaction(self.sessions) as session:
                    dispatch.release_jobs(session, unsent["job"])
                    dispatch.release_chunks(session, [(batch_id, chunk) for batch_id, chunk, _ in unsent["chunk"]])
                    webhooks.release(session, unsent["webhook"])
                raise BrokerDownError(f"the broker refused {sum(map(len, unsent.values()))} messages")
            if max(map(len, claimed.values())) < page:
                return

    # --- checks ----------------------------------------------------------------

    def check_broker_marker(self, client):
        """If the broker lost its data, mark everything it held unsent.

        Redis (``client``) keeps a marker key; its absence means Redis lost
        its data, and the first dispatcher to notice writes it again and
        acts. An in-process broker (no ``client``) lives and dies with this
        process, so it is empty when the dispatcher first looks.
        """
        if client is None:
            lost = self._first_check
        else:
            lost = client.get(keys.BROKER_MARKER) is None and bool(client.set(keys.BROKER_MARKER, self.marker, nx=True))
        self._first_check = False
        if not lost:
            return
        with transaction(self.sessions) as session:
            forgotten = dispatch.forget_broker(session)
        self._suspects.clear()
        BROKER_LOSSES.labels(self.deployment).inc()
        if any(forgotten.values()):
            log.warning("the broker holds none of its messages (it restarted empty, or was flushed); sending again "
                        "%(jobs)d jobs, %(chunks)d chunks, %(webhook_events)d webhook events", forgotten)

    def recover_abandoned(self):
        """Put the work of workers whose leases expired back in the queue."""
        if time.monotonic() < self._judge_leases_after:
            return
        with transaction(self.sessions) as session:
            found = recovery.recover_abandoned(session, self.settings, utcnow())
        if found.requeued or found.failed:
            RECOVERED.labels(self.deployment, "requeued").inc(found.requeued)
            RECOVERED.labels(self.deployment, "failed").inc(found.failed)
            log.warning("%d running jobs and rows had an expired lease (their worker died): %d requeued, "
                        "%d failed after their last attempt", found.requeued + found.failed, found.requeued,
                        found.failed)

    def expire_batches(self):
        """End the /v1 batches past their ``expires_at`` (``openai_batches.expire_batches``)."""
        with transaction(self.sessions) as session:
            expired = openai_batches.expire_batches(session, utcnow())
        if expired:
            log.info("%d batches expired: %s", len(expired), ", ".join(expired))

    def find_lost_messages(self):
        """Mark unsent what the broker has been missing for two checks in a row."""
        channel = self._channel()
        before = utcnow()
        for model in self.settings.models:
            for lane in keys.LANES:
                queue = keys.queue_name(model, lane)
                held = channel.queue_declare(queue=queue, passive=False).message_count
                unaccounted = dispatch.unaccounted_jobs if lane == "interactive" else dispatch.unaccounted_chunks
                with transaction(self.sessions) as session:
                    suspects = unaccounted(session, model, held, before)
                lost = suspects & self._suspects.get(queue, set())
                self._suspects[queue] = suspects
                if lost:
                    self._release_lost(lane, sorted(lost), queue)

    def _release_lost(self, lane, lost, queue):
        release = dispatch.release_lost_jobs if lane == "interactive" else dispatch.release_lost_chunks
        with transaction(self.sessions) as session:
            release(session, lost)
        kind = "job" if lane == "interactive" else "chunk"
        LOST.labels(self.deployment, kind).inc(len(lost))
        log.warning("%s is missing %d %s messages the database says were sent; sending them again",
                    queue, len(lost), kind)

    # --- the broker connection and failures ------------------------------------

    def _channel(self):
        if self._connection is None:
            self._connection = self.app.connection_for_write()
        return self._connection.default_channel

    def _broker_client(self):
        """The broker's Redis client (None for the in-process broker), after
        a ping: a broker that is down fails the round here, before any
        work is claimed for it."""
        client = getattr(self._channel(), "client", None)
        if client is not None:
            client.ping()
        return client

    def _close_connection(self):
        if self._connection is not None:
            try:
                self._connection.release()
            except Exception:
                pass
            self._connection = None

    def _failed(self, error):
        """Log a failure once per kind of outage; after a database outage,
        give workers a lease's time to renew before judging leases."""
        if is_unreachable(error):
            what = "database"
            self._judge_leases_after = time.monotonic() + self.settings.lease_seconds
        elif isinstance(error, (BrokerDownError, *BROKER_ERRORS)):
            what = "broker"
            self._close_connection()
            self._suspects.clear()
        else:
            what = "unexpected"
        if self._failing != what:
            log.warning("dispatcher: the %s failed (%s: %s); trying again every %g s", what, type(error).__name__,
                        error, self.settings.dispatcher.interval, exc_info=what == "unexpected")
        self._failing = what

    def _recovered(self):
        if self._failing is not None:
            log.warning("dispatcher: working again after the %s failed", self._failing)
            self._failing = None


class BrokerDownError(Exception):
    """The broker refused messages; what it refused waits in the database."""


def start_dispatcher(celery_app, sessions, settings):
    """Start a dispatcher for ``celery_app``'s broker in a thread of this process."""
    return Dispatcher(celery_app, sessions, settings).start()
