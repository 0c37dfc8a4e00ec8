"""Accounting with a real worker (vLLM on the tiny model): a few jobs of one
key and a small batch of another; then the usage rows hold the sums of the
jobs' token counts, the batch object its rows' totals, and the requests'
engine seconds add up to the worker's busy time."""

import io

import pytest
from sqlalchemy import func, select

from queue_engine.models import Job, UsageDaily

pytestmark = pytest.mark.integration



def sums_by_owner(session, table, count, where=()):
    """``{owner_id: (requests, prompt tokens, completion tokens, engine seconds)}`` of ``table``'s rows."""
    rows = session.execute(
        select(table.owner_id, count, func.sum(table.prompt_tokens), func.sum(table.completion_tokens),
               func.sum(table.engine_seconds)).where(*where).group_by(table.owner_id))
    return {owner: (int(requests), int(prompt), int(completion), seconds)
            for owner, requests, prompt, completion, seconds in rows}


def test_usage_and_engine_time_add_up_with_a_real_worker(cluster):
    alice, bob = cluster.new_client(), cluster.new_client()
    worker = cluster.workers[0]
    jobs = [alice.submit_job({"model": "tiny", "prompt": f"Count to {n}:", "params": {"max_tokens": 3 + 2 * n}})
            for n in range(6)]
    rows = "".join(f"{n},What comes after {n}?\n" for n in range(40))
    batch = bob.submit_batch(io.BytesIO(f"id,prompt\n{rows}".encode()), "tiny", filename="rows.csv",
                             params={"max_tokens": 6})
    for job in jobs:
        assert alice.wait_for_job(job["id"], timeout=180)["status"] == "succeeded"
    done = bob.wait_for_batch(batch["id"], timeout=300)
    assert done["request_counts"]["completed"] == 40

    with cluster.sessions() as session:
        succeeded = [Job.status == "succeeded"]
        by_jobs = sums_by_owner(session, Job, func.count(), succeeded)
        by_usage = sums_by_owner(session, UsageDaily, func.sum(UsageDaily.requests))
        batch_rows = session.execute(
            select(func.sum(Job.prompt_tokens), func.sum(Job.completion_tokens), func.sum(Job.engine_seconds))
            .where(Job.batch_id == batch["id"], *succeeded)).one()
        missing_time = session.scalar(select(func.count()).where(*succeeded, Job.engine_seconds.is_(None)))
        all_engine_seconds = session.scalar(select(func.sum(Job.engine_seconds)).where(*succeeded))

    # Usage sums are the sums of the rows' token counts, key by key (the warm-up job's key too).
    assert by_usage.keys() == by_jobs.keys() and len(by_usage) == 3
    for owner, (requests, prompt, completion, seconds) in by_jobs.items():
        assert by_usage[owner][:3] == (requests, prompt, completion)
        assert by_usage[owner][3] == pytest.approx(seconds)

    # The batch object carries its rows' totals.
    assert done["usage"]["prompt_tokens"] == batch_rows[0] and done["usage"]["completion_tokens"] == batch_rows[1]
    assert done["usage"]["total_tokens"] == batch_rows[0] + batch_rows[1]
    assert done["usage"]["engine_seconds"] == pytest.approx(batch_rows[2]) and batch_rows[2] > 0

    # A key reads its own usage over the API.
    own = alice.session.get(f"{cluster.url}/api/v1/usage?group_by=key", timeout=10).json()
    [alice_sums] = [sums for sums in by_jobs.values() if sums[0] == len(jobs)]
    assert len(own["data"]) == 1
    assert (own["total"]["requests"], own["total"]["prompt_tokens"], own["total"]["completion_tokens"]) == \
        alice_sums[:3]

    # Every step's time went to the requests in it: with none aborted or failed, their engine seconds add
    # up to the worker's busy time (the warm-up job's too), up to float rounding.
    assert missing_time == 0
    busy = worker.metric("qe_engine_busy_seconds_total")
    assert busy > 0 and all_engine_seconds == pytest.approx(busy, rel=1e-6)
