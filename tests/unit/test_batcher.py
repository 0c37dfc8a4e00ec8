"""The engine loop's own logic, with a scripted stand-in for the engine.

These tests are about the loop (who joins which step, what happens to errors
and aborts); the real engine is exercised by the integration tests.
"""

import threading
from concurrent.futures import wait

import pytest

from queue_engine.errors import EngineRejectedError
from tests.helpers import wait_until
from workers.batcher import EngineLoop, EngineLoopStopped
from workers.engine import GenerationRequest


class ScriptedEngine:
    """Finishes each request after ``params['steps']`` steps; records every step's batch.

    Under ``limit_bulk(n)`` a step runs every interactive request and the
    first ``n`` bulk rows added; the other rows are held (they keep their
    remaining steps), as VllmEngine holds them.
    """

    max_num_seqs = 64

    def __init__(self, fail_on_step=None):
        self.remaining = {}
        self.lanes = {}
        self.bulk_limit = None
        self.limits = []
        self.batches = []
        self.aborted = []
        self.fail_on_step = fail_on_step
        self.step_gate = threading.Semaphore(0)
        self.gated = False

    def add(self, request):
        if request.prompt == "too long":
            raise EngineRejectedError("prompt is longer than the model allows")
        self.remaining[request.request_id] = request.params["steps"]
        self.lanes[request.request_id] = request.lane

    def limit_bulk(self, seats):
        self.limits.append(seats)
        self.bulk_limit = seats

    def step(self):
        if self.gated:
            self.step_gate.acquire()
        running = list(self.remaining)
        if self.bulk_limit is not None:
            held = [r for r in running if self.lanes[r] == "bulk"][self.bulk_limit:]
            running = [r for r in running if r not in held]
        self.batches.append(sorted(running))
        if self.fail_on_step == len(self.batches):
            raise RuntimeError("device lost")
        finished = []
        for request_id in running:
            self.remaining[request_id] -= 1
            if self.remaining[request_id] == 0:
                del self.remaining[request_id]
                finished.append((request_id, f"done {request_id}"))
        return finished

    def abort(self, request_id):
        self.aborted.append(request_id)
        self.remaining.pop(request_id, None)


def request(request_id, steps=3, prompt="hi", lane="interactive"):
    return GenerationRequest(request_id=request_id, params={"steps": steps}, prompt=prompt, lane=lane)


@pytest.fixture
def engine():
    return ScriptedEngine()


@pytest.fixture
def loop(engine):
    loop = EngineLoop(engine, idle_wait=0.01).start()
    yield loop
    engine.gated = False
    engine.step_gate.release()
    loop.stop()


@pytest.fixture
def unstarted(engine):
    """A loop not started yet: what is submitted before ``start()`` is all in
    its inbox at its first look (a started loop may take the first request
    and block in a gated step before the others arrive)."""
    loop = EngineLoop(engine, idle_wait=0.01)
    yield loop
    engine.gated = False
    engine.step_gate.release()
    loop.stop()


def test_loop_batches_requests_that_arrive_together(engine, loop):
    """Requests submitted before a step all run in that step: one batch, not one call each."""
    engine.gated = True
    futures = [loop.submit(request(f"r{i}", steps=2)) for i in range(8)]
    wait_until(lambda: loop.in_flight == 8, 5, "all requests taken in")
    for _ in range(2):
        engine.step_gate.release()
    done, _ = wait(futures, timeout=5)
    assert len(done) == 8
    assert engine.batches[0] == sorted(f"r{i}" for i in range(8))
    assert [f.result() for f in futures] == [f"done r{i}" for i in range(8)]


def test_late_request_joins_the_running_batch(engine, loop):
    """A request that arrives mid-way runs in the next step beside the ones already going."""
    engine.gated = True
    long = loop.submit(request("long", steps=10))
    engine.step_gate.release()
    wait_until(lambda: len(engine.batches) == 1, 5, "first step")
    short = loop.submit(request("short", steps=1))
    engine.step_gate.release()  # step 2 was already waiting with "long" alone
    wait_until(lambda: loop.in_flight == 2, 5, "short taken in after step 2")
    engine.step_gate.release()
    assert short.result(timeout=5) == "done short"
    assert engine.batches[1:] == [["long"], ["long", "short"]]
    assert not long.done(), "the long request is still generating"


def test_rejected_request_fails_alone(engine, loop):
    """A request the engine refuses fails its own future; the others run."""
    bad = loop.submit(request("bad", prompt="too long"))
    good = loop.submit(request("good", steps=1))
    with pytest.raises(EngineRejectedError, match="longer than the model allows"):
        bad.result(timeout=5)
    assert good.result(timeout=5) == "done good"


def test_abort_removes_the_request(engine, loop):
    """An aborted request leaves the engine and its future never resolves."""
    engine.gated = True
    future = loop.submit(request("gone", steps=5))
    wait_until(lambda: loop.in_flight == 1, 5, "request taken in")
    loop.abort("gone")
    engine.step_gate.release()
    wait_until(lambda: engine.aborted == ["gone"], 5, "abort to reach the engine")
    assert loop.in_flight == 0 and not future.done()


def test_failed_step_fails_every_request_in_it():
    """If a step raises, the requests in it fail (their tasks retry) and the loop goes on."""
    engine = ScriptedEngine(fail_on_step=1)
    loop = EngineLoop(engine, idle_wait=0.01).start()
    try:
        first = loop.submit(request("a", steps=2))
        with pytest.raises(RuntimeError, match="device lost"):
            first.result(timeout=5)
        assert loop.submit(request("b", steps=1)).result(timeout=5) == "done b"
    finally:
        loop.stop()


def test_stopped_loop_refuses_new_requests(engine):
    """After stop, submit raises instead of queueing work nobody will run."""
    loop = EngineLoop(engine, idle_wait=0.01).start()
    loop.stop()
    with pytest.raises(EngineLoopStopped):
        loop.submit(request("late"))


def test_bulk_rows_leave_seats_for_interactive_requests(engine, loop):
    """Bulk rows fill the batch only up to max_num_seqs minus the reserve; the rest wait in the loop."""
    engine.gated = True
    [loop.submit(request(f"b{i:02}", steps=2, lane="bulk")) for i in range(70)]
    # The first step may start before every row is in; by the second, all
    # 70 are waiting, and the loop seats only 60 of them.
    engine.step_gate.release()
    engine.step_gate.release()
    wait_until(lambda: len(engine.batches) >= 2, 5, "two steps")
    assert len(engine.batches[0]) <= 60 and len(engine.batches[1]) == 60


def test_an_interactive_request_joins_the_next_step_ahead_of_waiting_bulk_rows(engine, loop):
    engine.gated = True
    for i in range(100):
        loop.submit(request(f"b{i:02}", steps=5, lane="bulk"))
    engine.step_gate.release()
    wait_until(lambda: len(engine.batches) == 1, 5, "first step")
    urgent = loop.submit(request("urgent", steps=1))
    engine.step_gate.release()  # step 2 was already waiting with the bulk rows alone
    wait_until(lambda: loop.in_flight == 61, 5, "the interactive request taken in")
    engine.step_gate.release()
    assert urgent.result(timeout=5) == "done urgent"
    assert "urgent" in engine.batches[2] and loop.bulk_waiting == 40


def test_bulk_rows_take_the_seats_that_free_up(engine, loop):
    futures = [loop.submit(request(f"b{i:03}", steps=1, lane="bulk")) for i in range(130)]
    done, _ = wait(futures, timeout=10)
    assert len(done) == 130
    # Each row ran in one step; no step seated more than the 60 bulk seats, and
    # seats were refilled up to that. (How many rows the first step sees depends
    # on how fast they were submitted.)
    sizes = [len(batch) for batch in engine.batches]
    assert sum(sizes) == 130 and max(sizes) == 60


def test_a_newcomers_rows_take_the_next_seats_ahead_of_rows_the_worker_already_held(engine, unstarted):
    """Seats go by share between keys, not by arrival: bob's rows, arriving
    behind 60 of alice's waiting ones, share the very next step with hers."""
    def row(name, tenant):
        return GenerationRequest(request_id=name, params={"steps": 1}, prompt="hi", lane="bulk", tenant=tenant)

    loop = unstarted
    engine.gated = True
    for i in range(120):
        loop.submit(row(f"a{i:03}", "alice"))
    loop.start()
    wait_until(lambda: loop.bulk_waiting == 60, 5, "60 of alice's rows seated, 60 waiting")
    bob = [f"b{i:02}" for i in range(20)]
    for name in bob:
        loop.submit(row(name, "bob"))
    engine.step_gate.release()  # step 1: alice's first 60
    engine.step_gate.release()  # step 2
    wait_until(lambda: len(engine.batches) >= 2, 5, "the second step")
    assert set(bob) <= set(engine.batches[1]), "every row of bob's is in the next step"
    assert sum(name.startswith("a") for name in engine.batches[1]) == 40


def test_a_waiting_bulk_row_can_be_aborted(engine, unstarted):
    loop = unstarted
    engine.gated = True
    for i in range(61):
        loop.submit(request(f"b{i:02}", steps=5, lane="bulk"))
    loop.start()
    wait_until(lambda: loop.bulk_waiting == 1, 5, "one row left waiting")
    loop.abort("b60")
    engine.step_gate.release()
    wait_until(lambda: loop.bulk_waiting == 0, 5, "the waiting row dropped")
    assert loop.in_flight == 60 and engine.aborted == []


# --- the bulk-seat policy: few bulk rows beside interactive work -------------------------


@pytest.fixture
def bounded():
    """A loop whose engine runs at most 4 bulk rows while interactive requests are in it."""
    engine = ScriptedEngine()
    engine.bulk_seats_with_interactive = 4
    engine.gated = True
    # A reserve of 4, as without the bound, so the figures read as in the tests above.
    loop = EngineLoop(engine, idle_wait=0.01, reserve=4).start()
    yield engine, loop
    engine.gated = False
    engine.step_gate.release()
    loop.stop()


def test_with_the_bound_bulk_rows_leave_only_a_sixty_fourth_of_the_seats():
    """With a bound an interactive request makes room for itself (the engine
    then holds bulk rows), so bulk rows leave a sixty-fourth of the seats
    free instead of a sixteenth."""
    engine = ScriptedEngine()
    engine.bulk_seats_with_interactive = 4
    loop = EngineLoop(engine, idle_wait=0.01).start()
    try:
        futures = [loop.submit(request(f"b{i:03}", steps=1, lane="bulk")) for i in range(130)]
        done, _ = wait(futures, timeout=10)
        assert len(done) == 130 and max(len(batch) for batch in engine.batches) == engine.max_num_seqs - 1
    finally:
        loop.stop()


def bulk_in(batch):
    return [r for r in batch if r.startswith("b")]


def fill_with_bulk_then_add_urgent(engine, loop, urgent_steps=3):
    """70 bulk rows (60 seated), one step, then an interactive request taken in for step 3."""
    rows = [loop.submit(request(f"b{i:02}", steps=10, lane="bulk")) for i in range(70)]
    engine.step_gate.release()
    wait_until(lambda: len(engine.batches) == 1, 5, "first step")
    urgent = loop.submit(request("urgent", steps=urgent_steps))
    engine.step_gate.release()  # step 2 was already waiting with the bulk rows alone
    wait_until(lambda: loop.in_flight == 61, 5, "the interactive request taken in")
    return rows, urgent


def run_freely(engine):
    engine.gated = False
    engine.step_gate.release()


def test_interactive_work_bounds_the_bulk_rows_from_the_next_step(bounded):
    """Bulk fills the engine; an interactive request arrives: its first step runs 4 bulk rows, not 60."""
    engine, loop = bounded
    rows, urgent = fill_with_bulk_then_add_urgent(engine, loop)
    engine.step_gate.release()
    wait_until(lambda: len(engine.batches) == 3, 5, "step 3")
    assert len(bulk_in(engine.batches[1])) == 60
    assert "urgent" in engine.batches[2] and len(bulk_in(engine.batches[2])) == 4
    assert loop.in_flight == 61, "the other 56 rows are held in the engine, not dropped"
    run_freely(engine)
    assert urgent.result(timeout=5) == "done urgent"


def test_bulk_fills_the_engine_again_when_interactive_work_ends(bounded):
    engine, loop = bounded
    rows, urgent = fill_with_bulk_then_add_urgent(engine, loop, urgent_steps=3)
    run_freely(engine)
    assert urgent.result(timeout=5) == "done urgent"
    done, _ = wait(rows, timeout=10)
    assert len(done) == 70
    with_urgent = [i for i, batch in enumerate(engine.batches) if "urgent" in batch]
    assert with_urgent == [2, 3, 4]
    assert all(len(bulk_in(engine.batches[i])) == 4 for i in with_urgent)
    assert len(bulk_in(engine.batches[5])) == 60, "the step after it ends runs the full bulk batch again"
    assert engine.limits == [4, None], "the bound is set once when interactive work starts, lifted once it ends"


def test_no_bulk_row_is_lost_or_run_twice_under_the_bound(bounded):
    """Every row runs exactly its 10 steps and resolves once, however often it was held."""
    engine, loop = bounded
    rows, urgent = fill_with_bulk_then_add_urgent(engine, loop)
    later = [loop.submit(request(f"i{i}", steps=2)) for i in range(3)]
    run_freely(engine)
    done, _ = wait([*rows, urgent, *later], timeout=10)
    assert len(done) == 74
    assert [f.result() for f in rows] == [f"done b{i:02}" for i in range(70)]
    for i in range(70):
        assert sum(f"b{i:02}" in batch for batch in engine.batches) == 10
    assert loop.in_flight == 0 and loop.bulk_waiting == 0
    assert max(len(bulk_in(b)) for b in engine.batches if any(not r.startswith("b") for r in b)) == 4


def test_held_bulk_rows_and_interactive_requests_can_be_aborted(bounded):
    """A held row aborts like any other; aborting the only interactive request lifts the bound."""
    engine, loop = bounded
    rows, urgent = fill_with_bulk_then_add_urgent(engine, loop, urgent_steps=20)
    engine.step_gate.release()
    wait_until(lambda: len(engine.batches) == 3, 5, "step 3")
    assert "b59" not in engine.batches[2], "b59 is held"
    loop.abort("b59")
    loop.abort("urgent")
    engine.step_gate.release()  # step 4 was already waiting, before the aborts
    wait_until(lambda: engine.aborted == ["b59", "urgent"], 5, "aborts to reach the engine")
    engine.step_gate.release()
    wait_until(lambda: len(engine.batches) == 5, 5, "step 5")
    assert engine.limits == [4, None]
    assert len(bulk_in(engine.batches[4])) == 60, "59 seated rows run again, and one waiting row took b59's seat"
    run_freely(engine)
    done, _ = wait(rows[:59] + rows[60:], timeout=10)
    assert len(done) == 69
    wait_until(lambda: loop.in_flight == 0, 5, "the engine to empty")
    assert not rows[59].done() and not urgent.done()


def test_without_a_bound_bulk_keeps_its_seats_beside_interactive_work(engine):
    """bulk_seats_with_interactive=None turns the policy off: the engine is never limited."""
    engine.bulk_seats_with_interactive = 4
    loop = EngineLoop(engine, idle_wait=0.01, bulk_seats_with_interactive=None).start()
    try:
        rows = [loop.submit(request(f"b{i:02}", steps=3, lane="bulk")) for i in range(10)]
        urgent = loop.submit(request("urgent", steps=3))
        assert urgent.result(timeout=5) == "done urgent"
        wait(rows, timeout=5)
        assert engine.limits == [] and all(f.done() for f in rows)
    finally:
        loop.stop()


def test_the_profile_setting_reaches_the_engine_and_max_in_flight_turns_it_off():
    from queue_engine.settings import ModelProfile, load_settings
    from workers.engine import EngineSettings

    settings = load_settings(environ={})
    default = ModelProfile(path="/models/m")
    assert EngineSettings.from_profile(default, settings).bulk_seats_with_interactive == \
        default.bulk_seats_with_interactive
    off = ModelProfile(path="/models/m", max_in_flight=64, bulk_seats_with_interactive=64)
    assert EngineSettings.from_profile(off, settings).bulk_seats_with_interactive is None
