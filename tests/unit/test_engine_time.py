"""The engine loop's accounting of engine time, with a scripted engine whose
steps take a given time on the test's clock: each step's time is split evenly
between the requests that ran in it, a finished request's generation carries
the sum of its shares, and the worker's busy time is the sum of the steps."""

from concurrent.futures import wait

import pytest

from tests.helpers import wait_until
from tests.unit.test_batcher import ScriptedEngine, request
from workers.batcher import EngineLoop
from workers.engine import Generation


class TimedEngine(ScriptedEngine):
    """A :class:`ScriptedEngine` whose ``n``-th step takes ``step_seconds[n]``
    on its clock, and whose finished requests are :class:`Generation` s."""

    def __init__(self, step_seconds, **kwargs):
        super().__init__(**kwargs)
        self.now = 0.0
        self.step_seconds = step_seconds
        self.steps_begun = 0

    def clock(self):
        return self.now

    def step(self):
        self.steps_begun += 1
        finished = super().step()  # under the gate, where a test holds it
        self.now += self.step_seconds[len(self.batches) - 1]
        return [(request_id, Generation(text, "stop", 1, 1)) for request_id, text in finished]


def run_to_end(engine, requests, **options):
    """Hand ``requests`` to a new loop before it starts (so they enter the same first step); their results."""
    loop = engine.loop = EngineLoop(engine, clock=engine.clock, **options)
    futures = {r.request_id: loop.submit(r) for r in requests}
    loop.start()
    try:
        wait(futures.values(), timeout=10)
    finally:
        loop.stop()
    return {request_id: future.result() for request_id, future in futures.items()}


def test_each_step_is_split_evenly_between_the_requests_in_it():
    """Three requests of 1, 2 and 4 steps: each pays an equal share of every step it ran in."""
    engine = TimedEngine([0.3, 0.2, 0.5, 0.1])
    results = run_to_end(engine, [request("a", steps=1), request("b", steps=2), request("c", steps=4)])
    assert engine.batches == [["a", "b", "c"], ["b", "c"], ["c"], ["c"]]
    seconds = {request_id: result.engine_seconds for request_id, result in results.items()}
    assert seconds == pytest.approx({"a": 0.1, "b": 0.1 + 0.1, "c": 0.1 + 0.1 + 0.5 + 0.1})
    # Everything the requests paid is the engine's busy time.
    assert sum(seconds.values()) == pytest.approx(1.1)
    assert engine.loop.stats.busy_seconds == pytest.approx(1.1)
    assert results["a"].text == "done a" and results["a"].prompt_tokens == 1


def test_held_bulk_rows_pay_only_for_the_seats_bulk_ran_in():
    """Under a bound of one bulk row beside interactive work, the bulk rows together pay one seat of
    each step (an equal part each: the loop does not know which row ran); the sums still add up."""
    engine = TimedEngine([0.4, 0.4, 0.4])
    results = run_to_end(engine, [request("i", steps=2), *(request(f"b{n}", steps=1, lane="bulk") for n in range(3))],
                         bulk_seats_with_interactive=1)
    assert engine.batches == [["b0", "i"], ["b1", "i"], ["b2"]]
    seconds = {request_id: result.engine_seconds for request_id, result in results.items()}
    # Step 1: i and one row ran, 0.2 each; the three rows share theirs. Step 2: the same with two rows.
    # Step 3: b2 alone.
    assert seconds == pytest.approx({"i": 0.2 + 0.2, "b0": 0.2 / 3, "b1": 0.2 / 3 + 0.2 / 2,
                                     "b2": 0.2 / 3 + 0.2 / 2 + 0.4})
    assert sum(seconds.values()) == pytest.approx(1.2)
    assert engine.loop.stats.busy_seconds == pytest.approx(1.2)


def test_a_late_request_pays_from_its_first_step_and_an_aborted_one_charges_nobody():
    """A request that joins a running batch pays only for the steps it was in; what a request aborted
    mid-run paid is charged to no one else (it shows in the busy time only)."""
    engine = TimedEngine([0.2, 0.2, 0.2, 0.2])
    engine.gated = True
    loop = EngineLoop(engine, idle_wait=0.01, clock=engine.clock).start()
    try:
        long = loop.submit(request("long", steps=10))
        engine.step_gate.release()
        wait_until(lambda: engine.steps_begun == 2, 5, "step 2 waiting with long alone")
        short = loop.submit(request("short", steps=1))
        engine.step_gate.release()
        wait_until(lambda: loop.in_flight == 2, 5, "short taken in after step 2")
        engine.step_gate.release()
        assert short.result(timeout=5).engine_seconds == pytest.approx(0.1)
        assert engine.batches == [["long"], ["long"], ["long", "short"]]
        wait_until(lambda: engine.steps_begun == 4, 5, "step 4 waiting with long alone")
        loop.abort("long")  # taken in after step 4
        engine.step_gate.release()
        wait_until(lambda: loop.in_flight == 0, 5, "the long request aborted")
    finally:
        engine.gated = False
        engine.step_gate.release()
        loop.stop()
    assert not long.done()
    assert len(engine.batches) == 4 and loop.stats.busy_seconds == pytest.approx(0.8)
