"""VllmEngine.limit_bulk on real vLLM (the CPU build, the tiny model, in this process).

Bulk rows held back while interactive work runs must lose nothing: their
greedy outputs are the same tokens as when they run undisturbed.
"""

import dataclasses
import contextlib
import sys

import pytest

from workers.batcher import EngineLoop
from workers.engine import EngineSettings, GenerationRequest, VllmEngine

ROWS = 24
BULK_TOKENS = 40


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    # vLLM's CPU start-up scans every loaded module's globals, and Flask's
    # request/current_app proxies raise outside a request (the worker loads
    # its engine before Flask for this reason). In the whole suite Flask is
    # loaded by now, so the engine is built inside a dummy request context.
    if "flask" in sys.modules:
        from flask import Flask
        context = Flask(__name__).test_request_context()
    else:
        context = contextlib.nullcontext()
    with context:
        return VllmEngine(EngineSettings(model_dir=str(tiny_model_dir), max_num_seqs=64,
                                         engine_args={"max_model_len": 512, "seed": 0}))


def bulk_row(tag, i):
    return GenerationRequest(request_id=f"{tag}-b{i}", prompt=f"Question {i}: explain the list type.", lane="bulk",
                             params={"max_tokens": BULK_TOKENS, "temperature": 0, "ignore_eos": True})


def interactive(tag, tokens=12):
    return GenerationRequest(request_id=f"{tag}-urgent", prompt="What is a tuple?",
                             params={"max_tokens": tokens, "temperature": 0})


def run_to_end(engine, results, tag):
    """Step until nothing is left; keeps results by the request id without its tag."""
    while engine._engine.has_unfinished_requests():
        for request_id, generation in engine.step():
            results[request_id.removeprefix(f"{tag}-")] = generation
    return results


def running_bulk(engine):
    return sum(1 for r in engine._scheduler.running if r.priority > 0)


def test_held_bulk_rows_resume_with_the_same_greedy_output(engine):
    reference = {}
    for i in range(ROWS):
        engine.add(bulk_row("ref", i))
    engine.add(interactive("ref"))
    run_to_end(engine, reference, "ref")

    held = {}
    for i in range(ROWS):
        engine.add(bulk_row("held", i))
    for _ in range(5):  # the rows are prefilled and decoding
        engine.step()
    engine.add(interactive("held"))
    engine.limit_bulk(2)
    steps = 0
    while "urgent" not in held:
        for request_id, generation in engine.step():
            held[request_id.removeprefix("held-")] = generation
        steps += 1
        assert running_bulk(engine) <= 2, "only two bulk rows run beside the interactive request"
    assert steps <= 13, "the interactive request runs every step: one prefill, then a token a step"
    assert len(held) == 1, "the bulk rows were held, not finished early or dropped"
    engine.limit_bulk(None)
    run_to_end(engine, held, "held")

    assert held.keys() == reference.keys()
    for key, generation in reference.items():
        assert held[key] == generation, key
    assert all(g.completion_tokens == BULK_TOKENS for k, g in held.items() if k != "urgent")


def test_a_held_row_can_be_aborted_and_the_others_finish(engine):
    for i in range(8):
        engine.add(bulk_row("abort", i))
    engine.step()
    engine.add(interactive("abort"))
    engine.limit_bulk(1)
    engine.step()
    engine.abort("abort-b7")  # the latest admitted: held
    results = run_to_end(engine, {}, "abort")
    engine.limit_bulk(None)
    results = run_to_end(engine, results, "abort")
    assert sorted(results) == sorted([f"b{i}" for i in range(7)] + ["urgent"])
    assert engine._held == [] and engine._scheduler.requests == {}


def test_the_loop_bounds_bulk_on_real_vllm_and_outputs_match(engine):
    """Through EngineLoop: the same rows, with and without interactive requests arriving among them."""
    def run(tag, with_interactive):
        loop = EngineLoop(engine, idle_wait=0.01, bulk_seats_with_interactive=2).start()
        try:
            futures = {f"b{i}": loop.submit(bulk_row(tag, i)) for i in range(ROWS)}
            if with_interactive:
                futures["urgent"] = loop.submit(interactive(tag, tokens=24))
            # The text and tokens must match; engine time depends on who shared the steps.
            return {key: dataclasses.replace(future.result(timeout=120), engine_seconds=None)
                    for key, future in futures.items()}
        finally:
            loop.stop()

    alone, mixed = run("alone", False), run("mixed", True)
    assert {k: v for k, v in mixed.items() if k != "urgent"} == alone
    assert mixed["urgent"].completion_tokens > 0
    assert engine._held == [] and engine._scheduler.requests == {}
