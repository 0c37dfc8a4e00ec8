"""Fair share in the bulk lane (``queue_engine.fairshare``), on SQLite and
PostgreSQL: the broker holds a small window of each model's chunks, and each
free place in it goes to the key with the fewest rows in service per unit of
share, whatever order the batches came in."""

import io
from collections import Counter
from datetime import timedelta

import pytest
from sqlalchemy import update

from queue_engine import batches, fairshare
from queue_engine.db import transaction
from queue_engine.fairshare import Tenant, Waiting, pick
from queue_engine.models import ApiKey, BatchChunk, utcnow
from queue_engine.schemas import BatchCreate
from queue_engine.uploads import Upload, read_rows
from tests.conftest import make_key
from tests.work import claim_chunk

CHUNK_ROWS = 2


def new_batch(sessions, settings, owner, rows, model="tiny"):
    """A batch of ``rows`` rows in chunks of two, all pending (as an upload leaves it)."""
    settings = settings.model_copy(update={"batches": settings.batches.model_copy(update={"chunk_rows": CHUNK_ROWS})})
    request = BatchCreate(model=model)
    data = io.BytesIO(("prompt\n" + "".join(f"row {n}\n" for n in range(rows))).encode())
    with transaction(sessions) as session:
        return batches.create_batch(session, owner, settings, request, read_rows(data, "csv", Upload.from_request(
            request, settings)), file_format="csv", filename="f.csv").id


def fill_window(sessions, window, now=None):
    with transaction(sessions) as session:
        return fairshare.claim_fair_chunks(session, now or utcnow(), window, CHUNK_ROWS)


def take(sessions, claimed):
    """Workers take the claimed chunks: their rows run, the window is free again."""
    with transaction(sessions) as session:
        for batch_id, chunk, _ in claimed:
            claim_chunk(session, batch_id, chunk)


def set_share(sessions, owner, share):
    with transaction(sessions) as session:
        session.execute(update(ApiKey).where(ApiKey.id == owner).values(share=share))


@pytest.fixture
def keys(sessions):
    return [make_key(sessions, name)[1] for name in ("alice", "bob", "carol")]


def test_an_upload_leaves_its_chunks_for_the_dispatcher(sessions, settings, keys):
    batch_id = new_batch(sessions, settings, keys[0], 10)
    with sessions() as session:
        states = session.scalars(BatchChunk.__table__.select().with_only_columns(BatchChunk.state)
                                 .where(BatchChunk.batch_id == batch_id)).all()
    assert states == ["pending"] * 5


def test_the_broker_holds_at_most_a_window_of_a_models_chunks(sessions, settings, keys):
    batch_id = new_batch(sessions, settings, keys[0], 20)
    assert fill_window(sessions, 3) == [(batch_id, 0, "tiny"), (batch_id, 1, "tiny"), (batch_id, 2, "tiny")]
    assert fill_window(sessions, 3) == [], "the window is full until a worker takes a chunk"
    take(sessions, [(batch_id, 0, "tiny")])
    assert fill_window(sessions, 3) == [(batch_id, 3, "tiny")]


def test_a_small_batch_behind_a_large_one_gets_the_next_places(sessions, settings, keys):
    """Alice's large batch holds the engine; Bob's, uploaded later, goes next,
    until his rows in service equal hers."""
    alice, bob = keys[0], keys[1]
    large = new_batch(sessions, settings, alice, 200)
    take(sessions, fill_window(sessions, 4))  # alice: 8 rows running
    small = new_batch(sessions, settings, bob, 20)

    claimed = fill_window(sessions, 4)

    assert [batch for batch, _, _ in claimed] == [small] * 4, "bob has 0 rows in service against alice's 8"
    take(sessions, claimed)
    claimed = fill_window(sessions, 4)
    assert Counter(batch for batch, _, _ in claimed) == {large: 2, small: 2}, "level: they alternate"
    assert claimed[0][0] == large, "on a tie, the older batch first"


def test_places_follow_the_keys_shares(sessions, settings, keys):
    alice, bob, carol = keys
    set_share(sessions, carol, 2)
    batch_of = {owner: new_batch(sessions, settings, owner, 100) for owner in keys}

    claimed = fill_window(sessions, 40)

    counts = Counter(batch for batch, _, _ in claimed)
    assert [counts[batch_of[owner]] for owner in keys] == [10, 10, 20]


def test_a_key_with_nothing_waiting_leaves_its_places_to_the_others(sessions, settings, keys):
    alice, bob = keys[0], keys[1]
    new_batch(sessions, settings, bob, 2)
    take(sessions, fill_window(sessions, 1))  # bob's only chunk runs: he has nothing more waiting
    batch_id = new_batch(sessions, settings, alice, 40)

    claimed = fill_window(sessions, 10)

    assert claimed == [(batch_id, chunk, "tiny") for chunk in range(10)], "every place goes to alice"


def test_a_keys_batches_share_its_places(sessions, settings, keys):
    first = new_batch(sessions, settings, keys[0], 40)
    second = new_batch(sessions, settings, keys[0], 40)
    claimed = fill_window(sessions, 6)
    assert [batch for batch, _, _ in claimed] == [first, second] * 3
    assert [chunk for batch, chunk, _ in claimed if batch == first] == [0, 1, 2], "a batch's chunks in order"


def test_each_model_has_its_own_window(sessions, settings, keys):
    settings = settings.model_copy(update={"models": {**settings.models, "other": settings.models["tiny"]}})
    tiny = new_batch(sessions, settings, keys[0], 20)
    other = new_batch(sessions, settings, keys[1], 20, model="other")
    claimed = fill_window(sessions, 2)
    assert sorted(claimed) == sorted([(tiny, 0, "tiny"), (tiny, 1, "tiny"),
                                      (other, 0, "other"), (other, 1, "other")])


def test_a_chunk_held_back_for_a_retry_waits_for_its_time(sessions, settings, keys):
    batch_id = new_batch(sessions, settings, keys[0], 2)
    later = utcnow() + timedelta(seconds=60)
    with transaction(sessions) as session:
        session.execute(update(BatchChunk).where(BatchChunk.batch_id == batch_id).values(retry_at=later))
    assert fill_window(sessions, 4) == []
    assert fill_window(sessions, 4, now=later) == [(batch_id, 0, "tiny")]


def test_pick_gives_each_place_to_the_key_furthest_below_its_share():
    """Without a database: places between a key with 40 rows in service and
    share 1, and one with none and share 3 (the older batch first on a tie)."""
    busy = Tenant(share=1, in_service=40, batches=[Waiting("a", 1, 1, chunks=100, in_service=40)])
    heavy = Tenant(share=3, batches=[Waiting("b", 2, 2, chunks=100)])

    picks = pick({1: busy, 2: heavy}, 38, chunk_rows=4)

    assert picks[:30] == ["b"] * 30, "b catches up to 40 rows per unit of share first: 120 rows"
    assert picks[30:] == ["a", "b", "b", "b"] * 2, "then 1 to 3"


def test_the_window_grows_to_what_the_workers_take_in_a_second(sessions, settings, keys):
    """Fast workers never wait for the window: it holds about half a second
    of what they took (counted over two), and never less than its least."""
    new_batch(sessions, settings, keys[0], 200)
    for _ in range(3):
        take(sessions, fill_window(sessions, 4))  # 12 chunks taken just now
    with sessions() as session:
        assert fairshare.windows(session, ["tiny", "idle"], utcnow(), 2) == {"tiny": 3, "idle": 2}
        later = utcnow() + timedelta(seconds=fairshare.RATE_SECONDS + 1)
        assert fairshare.windows(session, ["tiny"], later, 2) == {"tiny": 2}, "old takes no longer count"
    assert len(fill_window(sessions, 2)) == 3


# --- in the worker: seats in the engine ------------------------------------------


def test_the_next_seat_goes_to_the_tenant_with_fewest_seated_per_share():
    seats = fairshare.SeatQueue()
    for n in range(6):
        seats.push(f"a{n}", "alice", 1, f"a{n}")
    assert [seats.pop() for _ in range(4)] == ["a0", "a1", "a2", "a3"], "alone, alice takes every seat"
    for n in range(6):
        seats.push(f"b{n}", "bob", 1, f"b{n}")
    assert [seats.pop() for _ in range(4)] == ["b0", "b1", "b2", "b3"], "bob has none seated against alice's 4"
    seats.left("a0")
    assert seats.pop() == "a4", "a seat alice freed, and they are level"
    assert len(seats) == 3


def test_seats_follow_shares():
    seats = fairshare.SeatQueue()
    for n in range(30):
        seats.push(f"a{n}", "alice", 1, "alice")
        seats.push(f"c{n}", "carol", 2, "carol")
    assert Counter(seats.pop() for _ in range(30)) == {"alice": 10, "carol": 20}


def test_a_waiting_request_can_be_taken_out():
    seats = fairshare.SeatQueue()
    seats.push("a0", "alice", 1, "first")
    seats.push("a1", "alice", 1, "second")
    assert seats.remove("a0") == "first" and seats.remove("a0") is None
    assert seats.entries() == ["second"] and len(seats) == 1
