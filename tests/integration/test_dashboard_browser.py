"""The dashboard in a real headless Chromium (Debian's, driven by Playwright)
against the web service over HTTP, with a real worker running vLLM on the
tiny model, Redis and PostgreSQL (the ``cluster`` fixture).

Screenshots are kept in ``test-artifacts/dashboard/``.
"""

import csv
import io
import re
import secrets
from pathlib import Path

import pytest
from playwright.sync_api import expect, sync_playwright

from queue_engine.client import Client
from queue_engine.db import transaction
from queue_engine.models import ApiKey
from tests.conftest import make_key
from tests.helpers import ROOT, wait_until

pytestmark = pytest.mark.integration

CHROMIUM = Path("/usr/bin/chromium")
SHOTS = ROOT / "test-artifacts" / "dashboard"
#: Milliseconds Playwright waits for what a page should show.
SHOWS_WITHIN = 30_000


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed (tests/system-deps.sh installs it: apt-get install chromium)")
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM))
        yield browser
        browser.close()


def new_user(cluster, operator=False):
    """A new key: ``(its name, the key in clear, an API client with it)``."""
    name = f"{'ops' if operator else 'user'}-{secrets.token_hex(3)}"
    key, owner_id = make_key(cluster.sessions, name)
    if operator:
        with transaction(cluster.sessions) as session:
            session.get(ApiKey, owner_id).is_operator = True
    return name, key.key, Client(cluster.url, key.key)


def sign_in(context, url, name, key):
    """Open the dashboard in ``context``, get sent to the sign-in form, sign in; the overview page."""
    page = context.new_page()
    page.goto(url + "/")
    expect(page).to_have_url(re.compile(r"/dashboard/sign-in$"), timeout=SHOWS_WITHIN)
    page.fill("#key", key)
    page.click("main form button[type=submit]")
    expect(page.locator("header .who")).to_contain_text(name, timeout=SHOWS_WITHIN)
    assert page.url == url + "/dashboard"
    return page


def bar_numbers(page):
    """The first progress bar's numbers, as its attributes carry them."""
    bar = page.locator("main .progress").first
    return {name: int(bar.get_attribute(f"data-{name}")) for name in ("total", "completed", "failed", "cancelled")}


def csv_rows(count, prefix="Question"):
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(("id", "prompt"))
    writer.writerows((f"r{i}", f"{prefix} {i}: what comes after {i}?") for i in range(count))
    return io.BytesIO(buffer.getvalue().encode())


def shot(page, name, full_page=True):
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=full_page)


def test_a_tribunal_jobs_page_shows_its_trace(cluster, browser):
    """Sign in, open a finished tribunal from the overview: its candidates, critique and final, as the API has them."""
    name, key, client = new_user(cluster)
    body = {"prompt": "What does list.append do?", "candidates": ["tiny", "tiny"], "judge": "tiny",
            "bypass": "never", "params": {"max_tokens": 24, "temperature": 0.8}}
    done = client.wait_for_job(client.submit_tribunal(body)["id"], timeout=180)
    assert done["status"] == "succeeded", done["error"]
    trace = done["tribunal"]
    context = browser.new_context()
    page = sign_in(context, cluster.url, name, key)
    page.click(f"a[href='/dashboard/jobs/{done['id']}']")
    expect(page.locator("#tribunal")).to_be_visible(timeout=SHOWS_WITHIN)
    assert page.locator(".kind").text_content() == "tribunal"
    candidates = page.locator("#tribunal .candidate pre")
    assert [text.strip() for text in candidates.all_text_contents()] == [c["text"].strip() for c in trace["candidates"]]
    assert page.locator("#tribunal pre.critique").text_content().strip() == trace["critique"].strip()
    assert page.locator("#tribunal pre.final").text_content().strip() == trace["final"].strip()
    assert "ran in full" in page.locator("#tribunal .bypass").text_content()
    assert page.locator("pre.prompt").text_content() == body["prompt"]
    shot(page, "tribunal-job")
    context.close()


def test_a_running_batchs_bar_advances_and_the_page_cancels_it(cluster, browser):
    """Sign in, watch a running batch's bar grow by the page's own refresh (no reload), cancel it from
    the page, and see it cancelled through the API."""
    name, key, client = new_user(cluster)
    batch = client.submit_batch(csv_rows(3000), "tiny", filename="long.csv", params={"max_tokens": 32})
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = sign_in(context, cluster.url, name, key)
    row = page.locator(f"tr[data-batch='{batch['id']}']")
    expect(row).to_be_visible(timeout=SHOWS_WITHIN)
    row.locator("a").first.click()
    expect(page.locator("h2 .id")).to_have_text(batch["id"], timeout=SHOWS_WITHIN)
    page.evaluate("window.notReloaded = true")

    first = wait_until(lambda: (n := bar_numbers(page))["completed"] > 0 and n, 180, "the first rows to complete")
    shot(page, "batch-running")
    second = wait_until(lambda: (n := bar_numbers(page))["completed"] > first["completed"] and n, 120,
                        f"the bar to advance past {first['completed']} rows")
    assert page.evaluate("window.notReloaded === true"), "the page was reloaded, not refreshed in place"
    assert first["total"] == second["total"] == 3000
    text = page.locator("main .progress .n-completed").first.text_content()
    assert int(text) >= second["completed"]
    assert client.get_batch(batch["id"])["request_counts"]["completed"] >= second["completed"]
    assert re.match(r"[\d.,]+ rows/s", page.locator(".rate").text_content())
    overview = context.new_page()  # beside the watched page, which must not reload
    overview.goto(cluster.url + "/dashboard")
    expect(overview.locator(f"tr[data-batch='{batch['id']}'] .status")).to_have_text("in progress")
    shot(overview, "overview-running")
    overview.close()

    page.click("text=Cancel batch")
    expect(page.locator(".flashes")).to_contain_text("Batch cancelled", timeout=SHOWS_WITHIN)
    assert client.get_batch(batch["id"])["status"] in ("cancelling", "cancelled")
    ended = wait_until(lambda: (b := client.get_batch(batch["id"]))["status"] == "cancelled" and b, 120,
                       "the batch to be cancelled")
    assert ended["request_counts"]["cancelled"] > 0
    expect(page.locator("h2 .status")).to_have_text("cancelled", timeout=SHOWS_WITHIN)
    expect(page.locator("text=Cancel batch")).to_have_count(0)
    shot(page, "batch-cancelled")
    page.goto(cluster.url + "/dashboard")
    shot(page, "overview")
    context.close()


def test_another_keys_work_is_nowhere(cluster, browser):
    """Bob's job and batch appear nowhere on Alice's pages; their pages are 404 for her; an operator sees them."""
    _, _, bob = new_user(cluster)
    bob_job = bob.submit_job({"model": "tiny", "prompt": "Bob's question", "params": {"max_tokens": 4}})
    bob_batch = bob.submit_batch(csv_rows(3, "Bob's row"), "tiny", filename="bob.csv", params={"max_tokens": 4})
    name, key, alice = new_user(cluster)
    alice_job = alice.submit_job({"model": "tiny", "prompt": "Alice's question", "params": {"max_tokens": 4}})
    context = browser.new_context()
    page = sign_in(context, cluster.url, name, key)
    expect(page.locator(f"tr[data-job='{alice_job['id']}']")).to_be_visible(timeout=SHOWS_WITHIN)
    html = page.content()
    assert bob_job["id"] not in html and bob_batch["id"] not in html and "Bob's" not in html
    for path in (f"/dashboard/jobs/{bob_job['id']}", f"/dashboard/batches/{bob_batch['id']}",
                 f"/dashboard/batches/{bob_batch['id']}/results?format=csv"):
        response = page.goto(cluster.url + path)
        assert response.status == 404
        assert "Not found" in page.locator("main h2").text_content() and "Bob's" not in page.content()
    shot(page, "another-keys-job-404")

    ops_name, ops_key, _ = new_user(cluster, operator=True)
    operator = sign_in(browser.new_context(), cluster.url, ops_name, ops_key)
    for work_id in (bob_job["id"], bob_batch["id"], alice_job["id"]):
        expect(operator.locator(f"a[href$='{work_id}']")).to_have_count(1, timeout=SHOWS_WITHIN)
    shot(operator, "overview-operator")
    context.close()


def test_without_javascript_the_pages_hold_the_same_data(cluster, browser):
    """With JavaScript off: sign-in works, the overview and the batch page show what the API shows."""
    name, key, client = new_user(cluster)
    batch = client.wait_for_batch(
        client.submit_batch(csv_rows(5), "tiny", filename="small.csv", params={"max_tokens": 4})["id"], timeout=120)
    assert batch["status"] == "completed"
    job = client.wait_for_job(client.submit_job({"model": "tiny", "prompt": "The list type",
                                                 "params": {"max_tokens": 8}})["id"], timeout=120)
    context = browser.new_context(java_script_enabled=False)
    page = sign_in(context, cluster.url, name, key)
    assert page.locator(f"tr[data-batch='{batch['id']}'] .progress").get_attribute("data-completed") == "5"
    assert page.locator("#model-tiny .backlog").count() == 1
    page.goto(f"{cluster.url}/dashboard/batches/{batch['id']}")
    counts = batch["request_counts"]
    assert bar_numbers(page) == counts
    assert page.locator(".progress .n-completed").text_content() == str(counts["completed"])
    shot(page, "batch-no-javascript")
    page.goto(f"{cluster.url}/dashboard/jobs/{job['id']}")
    assert page.locator("pre.answer").text_content().strip() == job["result"]["text"].strip()
    context.close()


def test_the_overview_fits_a_phone(cluster, browser):
    """On a phone-sized screen the page does not scroll sideways: the lists stack, each batch's bar in view."""
    name, key, client = new_user(cluster)
    batch = client.submit_batch(csv_rows(5), "tiny", filename="phone.csv", params={"max_tokens": 4})
    client.submit_job({"model": "tiny", "prompt": "The list type", "params": {"max_tokens": 4}})
    context = browser.new_context(viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True)
    page = sign_in(context, cluster.url, name, key)
    shot(page, "overview-phone")
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    bar = page.locator(f"tr[data-batch='{batch['id']}'] .progress svg").bounding_box()
    assert bar["width"] > 200 and bar["x"] + bar["width"] <= 390
    context.close()
