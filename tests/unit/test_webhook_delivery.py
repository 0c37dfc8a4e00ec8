"""Where a webhook may go (the SSRF guard) and one real HTTP attempt to a
receiver on loopback: what is sent, and what each answer becomes."""

import ipaddress
import socket
import threading
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from queue_engine import apikeys, targets, webhooks
from queue_engine.errors import SettingsError
from queue_engine.models import utcnow
from queue_engine.settings import load_settings
from tests.helpers import free_port
from tests.receiver import Receiver
from workers.webhooks import post_event, retry_after_seconds

LOOPBACK = targets.allowed_networks(["127.0.0.0/8"])


def resolves_to(*addresses):
    """A stand-in for ``getaddrinfo`` that answers with ``addresses`` (no DNS here)."""
    def resolve(host, port, type=None):
        return [(socket.AF_INET6 if ":" in a else socket.AF_INET, type, 6, "", (a, port)) for a in addresses]
    return resolve


@pytest.mark.parametrize("url, why", [
    ("http://169.254.169.254/latest/meta-data/", "link-local"),
    ("http://10.0.0.5/hook", "private"),
    ("http://172.16.3.4/hook", "private"),
    ("http://192.168.1.1/hook", "private"),
    ("http://127.0.0.1:8000/hook", "loopback"),
    ("http://[::1]/hook", "loopback"),
    ("http://[::ffff:127.0.0.1]/hook", "loopback address (127.0.0.1, inside an IPv6 address)"),
    ("http://[::ffff:169.254.169.254]/", "link-local"),
    ("http://[2002:a00:1::]/", "private address (10.0.0.1, inside an IPv6 address)"),
    ("http://[64:ff9b::7f00:1]/", "loopback address (127.0.0.1"),
    ("http://[fe80::1]/", "link-local"),
    ("http://[fd00::1]/", "private"),
    ("http://224.0.0.251/", "multicast"),
    ("http://0.0.0.0/", "unspecified"),
    ("http://100.64.0.1/", "reserved"),
    ("http://localhost/hook", "'localhost' resolves to"),
    ("ftp://example.org/hook", "scheme must be http or https"),
    ("file:///etc/passwd", "scheme must be http or https"),
    ("gopher://127.0.0.1:6379/_FLUSHALL", "scheme must be http or https"),
    ("http:///nohost", "no host"),
])
def test_forbidden_targets_are_refused_saying_why(url, why):
    with pytest.raises(targets.ForbiddenTargetError, match="^webhook_url: ") as refused:
        targets.check_url(url)
    assert why in str(refused.value)


def test_a_name_is_refused_if_any_address_it_resolves_to_is_private():
    resolve = resolves_to("93.184.215.14", "10.1.2.3")
    with pytest.raises(targets.ForbiddenTargetError, match="'hooks.example.org' resolves to 10.1.2.3"):
        targets.check_url("https://hooks.example.org/x", resolve=resolve)


def test_a_public_target_passes_with_every_address_it_resolves_to():
    target = targets.check_url("https://hooks.example.org:8443/x?y=1",
                               resolve=resolves_to("93.184.215.14", "2606:2800:21f:cb07:6820:80da:af6b:8b2c"))
    assert (target.scheme, target.host, target.port, target.path) == ("https", "hooks.example.org", 8443, "/x?y=1")
    assert target.addresses[0] == ipaddress.ip_address("93.184.215.14") and len(target.addresses) == 2


def test_webhook_allow_admits_a_private_network_and_nothing_else():
    allow = targets.allowed_networks(["10.0.0.0/8"])
    assert targets.check_url("http://10.9.8.7/hook", allow).addresses == [ipaddress.ip_address("10.9.8.7")]
    assert targets.check_url("http://[::ffff:10.9.8.7]/hook", allow)
    with pytest.raises(targets.ForbiddenTargetError):
        targets.check_url("http://192.168.0.1/hook", allow)


def test_a_host_that_does_not_resolve_is_refused_as_such():
    with pytest.raises(targets.UnresolvableTargetError, match="does not resolve"):
        targets.check_url("http://no-such-host.invalid/hook")


def test_webhook_allow_must_hold_networks():
    with pytest.raises(SettingsError, match="webhook_allow.*'10.0.0.0/33' is not a network"):
        load_settings(environ={"QUEUE_ENGINE_WEBHOOK_ALLOW": "10.0.0.0/33"})


def test_retry_after_reads_seconds_and_http_dates():
    now = utcnow()
    in_a_minute = (now + timedelta(seconds=60)).strftime("%a, %d %b %Y %H:%M:%S GMT")
    assert retry_after_seconds("30") == 30.0
    assert 58 <= retry_after_seconds(in_a_minute, now=now) <= 60
    assert retry_after_seconds(None) is None and retry_after_seconds("soon") is None


# --- one attempt over real HTTP -------------------------------------------------


SECRET = apikeys.new_webhook_secret()


def an_attempt(url, number=1):
    return webhooks.Attempt("msg_test1", number, url, '{"type":"job.completed","timestamp":"t","data":{}}', [SECRET])


@pytest.fixture
def receiver():
    receiver = Receiver(secrets=[SECRET])
    yield receiver
    receiver.stop()


def test_an_attempt_posts_the_signed_body_and_a_2xx_delivers(receiver):
    outcome = post_event(an_attempt(receiver.url), LOOPBACK)
    assert outcome.delivered and (outcome.status_code, outcome.error) == (200, None)
    [arrived] = receiver.deliveries
    assert arrived.verified_by == [0] and arrived.webhook_id == "msg_test1"
    assert arrived.body["type"] == "job.completed"
    assert arrived.headers["host"] == f"127.0.0.1:{receiver.port}"
    assert arrived.headers["content-type"] == "application/json"


def test_an_error_answer_is_recorded_with_its_status_and_retry_after(receiver):
    receiver.script([(503, {"Retry-After": "7"})])
    outcome = post_event(an_attempt(receiver.url), LOOPBACK)
    assert (outcome.delivered, outcome.status_code, outcome.error, outcome.retry_after) == (False, 503, "HTTP 503", 7.0)


def test_redirects_are_not_followed(receiver):
    target = Receiver(secrets=[SECRET])
    receiver.script([(302, {"Location": target.url})])
    outcome = post_event(an_attempt(receiver.url), LOOPBACK)
    target.stop()
    assert (outcome.status_code, outcome.delivered) == (302, False) and target.deliveries == []


def test_without_webhook_allow_loopback_is_refused_at_delivery_for_good(receiver):
    outcome = post_event(an_attempt(receiver.url), allow=())
    assert outcome.final and "loopback" in outcome.error and receiver.deliveries == []


def test_a_closed_port_is_an_error_worth_retrying():
    outcome = post_event(an_attempt(f"http://127.0.0.1:{free_port()}/hook"), LOOPBACK)
    assert outcome.status_code is None and not outcome.final
    assert outcome.error.startswith("no answer: ") and "refused" in outcome.error.lower()


def test_a_receiver_slower_than_the_timeout_is_given_up_on():
    release = threading.Event()

    class Slow(BaseHTTPRequestHandler):
        def do_POST(self):
            release.wait(10)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        outcome = post_event(an_attempt(f"http://127.0.0.1:{server.server_port}/hook"), LOOPBACK, timeout=0.5)
    finally:
        release.set()
        server.shutdown()
        server.server_close()
    assert outcome.status_code is None and "timed out" in outcome.error.lower()
    assert 400 <= outcome.duration_ms < 5000
