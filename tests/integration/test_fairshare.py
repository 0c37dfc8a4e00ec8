"""Fair share between keys in the bulk lane, with a real worker on the tiny
model: a small batch uploaded behind a large one starts at once and runs at
its share; shares follow the keys' weights; and a key alone gets the whole
engine."""

import io
from collections import Counter

import pytest
from sqlalchemy import func, select, update

from queue_engine.client import Client
from queue_engine.models import ApiKey, Batch, Job
from tests.conftest import make_key
from tests.helpers import wait_until
from tests.integration.conftest import Cluster

pytestmark = pytest.mark.integration

#: Small chunks and a window of a few of them, so shares are fine-grained.
CONFIG = "[batches]\nchunk_rows = 8\n[dispatcher]\nbulk_window = 6\n"
PARAMS = {"max_tokens": 8, "temperature": 0}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_model_dir, redis_server, cluster_database_url):
    cluster = Cluster(tmp_path_factory.mktemp("fairshare"), tiny_model_dir, redis_server.url, cluster_database_url,
                      config_toml=CONFIG)
    cluster.start_worker()
    yield cluster
    cluster.stop()


def new_key(cluster, name, share=1.0):
    key, owner_id = make_key(cluster.sessions, name)
    with cluster.sessions.begin() as session:
        session.execute(update(ApiKey).where(ApiKey.id == owner_id).values(share=share))
    return Client(cluster.url, key.key), owner_id


def upload(client, rows, tag):
    data = "id,prompt\n" + "".join(f"{tag}{i},Item {i} of batch {tag}: say something\n" for i in range(rows))
    return client.submit_batch(io.BytesIO(data.encode()), "tiny", filename=f"{tag}.csv", params=PARAMS)["id"]


def batch_rows(cluster, batch_id, *columns):
    with cluster.sessions() as session:
        return session.execute(select(*columns).where(Job.batch_id == batch_id)).all()


def count(cluster, batch_id, status):
    with cluster.sessions() as session:
        return session.scalar(select(func.count()).select_from(Job)
                              .where(Job.batch_id == batch_id, Job.status == status))


def finished_between(cluster, batch_ids, start, end):
    """Rows of each batch that finished in ``[start, end)``."""
    with cluster.sessions() as session:
        rows = session.execute(select(Job.batch_id, func.count()).where(
            Job.batch_id.in_(batch_ids), Job.status == "succeeded", Job.finished_at >= start, Job.finished_at < end)
            .group_by(Job.batch_id)).all()
    return Counter(dict(rows))


def done(cluster, batch_id):
    with cluster.sessions() as session:
        return session.get(Batch, batch_id).status in ("completed", "failed")


def last_finished(cluster, batch_id):
    with cluster.sessions() as session:
        return session.scalar(select(func.max(Job.finished_at)).where(Job.batch_id == batch_id))


def test_a_small_batch_behind_a_large_one_starts_at_once_and_finishes_first(cluster):
    alice, _ = new_key(cluster, "fs-alice")
    bob, _ = new_key(cluster, "fs-bob")
    large = upload(alice, 5000, "a")
    wait_until(lambda: count(cluster, large, "succeeded") >= 200, 120, "alice's batch to be well under way")

    # Large enough that its run spans many of the worker's writes (finished rows are
    # stored in groups every 0.25 s), so shares over it are not a matter of one group.
    small = upload(bob, 800, "b")
    uploaded = max(created for (created,) in batch_rows(cluster, small, Job.created_at))

    wait_until(lambda: done(cluster, small), 180, "bob's batch to finish")
    started = min(started for (started,) in batch_rows(cluster, small, Job.started_at))
    first_answer = min(finished for (finished,) in batch_rows(cluster, small, Job.finished_at))
    assert (first_answer - uploaded).total_seconds() < 10, "bob's first answers come within seconds, not after alice's"
    assert count(cluster, small, "succeeded") == 800
    assert count(cluster, large, "queued") > 0, "bob finished long before alice"

    # While both ran, they shared the engine about equally (equal shares).
    ended = last_finished(cluster, small)
    both_running = started + (ended - started) / 4  # past the start, once bob's chunks are in service
    shares = finished_between(cluster, [large, small], both_running, ended)
    assert 0.5 <= shares[small] / shares[large] <= 2.0, shares

    # Bob gone, alice's rows fill every seat the worker has again.
    def alice_holds_the_worker():
        return count(cluster, large, "running") >= 128 or done(cluster, large)
    wait_until(alice_holds_the_worker, 60, "alice's rows to take the whole worker (max_in_flight 128)")
    wait_until(lambda: done(cluster, large), 300, "alice's batch to finish")
    assert count(cluster, large, "succeeded") == 5000


def test_three_keys_share_the_engine_by_weight(cluster):
    clients = [new_key(cluster, f"fs-w{n}", share)[0] for n, share in enumerate((1, 1, 2))]
    batch_ids = [upload(client, 1500, f"w{n}") for n, client in enumerate(clients)]
    wait_until(lambda: all(count(cluster, b, "succeeded") for b in batch_ids), 120, "every key's rows to run")
    with cluster.sessions() as session:
        start = session.scalar(select(func.max(Job.created_at)).where(Job.batch_id.in_(batch_ids)))

    wait_until(lambda: any(done(cluster, b) for b in batch_ids), 300, "the first batch to finish")
    end = min(last_finished(cluster, b) for b in batch_ids if done(cluster, b))
    window_start = start + (end - start) / 5  # once every key's chunks are in service
    counts = finished_between(cluster, batch_ids, window_start, end)
    first, second, heavy = (counts[b] for b in batch_ids)
    assert 0.7 <= first / second <= 1.4, counts
    assert 1.4 <= heavy / ((first + second) / 2) <= 2.8, counts
