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
    """Finishes each request after ``params['steps']`` steps; records every step's batch."""

    max_num_seqs = 64

    def __init__(self, fail_on_step=None):
        self.remaining = {}
        self.batches = []
        self.aborted = []
        self.fail_on_step = fail_on_step
        self.step_gate = threading.Semaphore(0)
        self.gated = False

    def add(self, request):
        if request.prompt == "too long":
            raise EngineRejectedError("prompt is longer than the model allows")
        self.remaining[request.request_id] = request.params["steps"]

    def step(self):
        if self.gated:
            self.step_gate.acquire()
        self.batches.append(sorted(self.remaining))
        if self.fail_on_step == len(self.batches):
            raise RuntimeError("device lost")
        finished = []
        for request_id in list(self.remaining):
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


def test_a_waiting_bulk_row_can_be_aborted(engine, loop):
    engine.gated = True
    for i in range(61):
        loop.submit(request(f"b{i:02}", steps=5, lane="bulk"))
    wait_until(lambda: loop.bulk_waiting == 1, 5, "one row left waiting")
    loop.abort("b60")
    engine.step_gate.release()
    wait_until(lambda: loop.bulk_waiting == 0, 5, "the waiting row dropped")
    assert loop.in_flight == 60 and engine.aborted == []
