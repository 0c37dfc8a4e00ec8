"""What the engine loop's metrics cost: engine throughput with them on and off.

One process, one real vLLM engine (the CPU build, a built-in tiny model),
and in each round two runs of the same requests through a fresh
``EngineLoop``: one with ``metrics=True`` while a thread scrapes its figures
the way Prometheus would (``workers.metrics.EngineCollector``, every
``--scrape-interval`` seconds), one with ``metrics=False``. The order
alternates between rounds, so drift on a shared machine falls on both sides.
Greedy decoding with ``ignore_eos``: every request generates exactly
``--max-tokens`` tokens, so both sides do the same work.

Prints each run, then the ratio of the median tokens/s with metrics to the
median without (the goal is 0.99 or more), and one JSON object as its last line.

    python bench/metrics_overhead.py [--model tiny-large] [--requests 256] [--max-tokens 32] [--rounds 5]
"""

import argparse
import os
import statistics
import sys
import threading
import time
from concurrent.futures import wait
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from workers.batcher import EngineLoop  # noqa: E402
from workers.engine import EngineSettings, GenerationRequest, VllmEngine, resolve_model_dir  # noqa: E402
from workers.metrics import EngineCollector  # noqa: E402
from bench.results import save  # noqa: E402

CACHE = Path(os.environ.get("QUEUE_ENGINE_BENCH_CACHE", Path.home() / ".cache" / "queue-engine-bench"))
GOAL = 0.99


def make_requests(count, max_tokens, tag):
    params = {"max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    return [GenerationRequest(request_id=f"{tag}-{n}", params=params, prompt=f"Question {n}: explain the list type.")
            for n in range(count)]


def scrape_until(stop, collector, interval):
    """Collect ``collector``'s families every ``interval`` seconds, as a Prometheus scrape would."""
    scrapes = 0
    while not stop.wait(interval):
        for family in collector.collect():
            list(family.samples)
        scrapes += 1
    return scrapes


def run_once(engine, requests, metrics, scrape_interval):
    """Tokens per second of ``requests`` through a new loop, and how many scrapes ran meanwhile."""
    loop = EngineLoop(engine, metrics=metrics)
    stop, scrapes = threading.Event(), []
    scraper = None
    if metrics:
        collector = EngineCollector()
        collector.watch("bench", "bench", loop, 0.0)
        scraper = threading.Thread(target=lambda: scrapes.append(scrape_until(stop, collector, scrape_interval)))
    futures = [loop.submit(request) for request in requests]  # all in the loop's first look
    started = time.perf_counter()
    loop.start()
    if scraper is not None:
        scraper.start()
    done, _ = wait(futures, timeout=3600)
    elapsed = time.perf_counter() - started
    stop.set()
    if scraper is not None:
        scraper.join()
    loop.stop()
    tokens = sum(future.result().completion_tokens for future in done)
    return tokens / elapsed, tokens, (scrapes[0] if scrapes else 0)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-large", choices=["tiny", "tiny-large"])
    parser.add_argument("--requests", type=int, default=256, help="requests per run (all in the engine at once)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5, help="rounds of one run with metrics and one without")
    parser.add_argument("--scrape-interval", type=float, default=1.0, help="seconds between scrapes while on")
    args = parser.parse_args()

    model_dir = resolve_model_dir(args.model, CACHE, log=print)
    engine = VllmEngine(EngineSettings(model_dir=str(model_dir), engine_args={"max_model_len": 512, "seed": 0},
                                       max_num_seqs=max(args.requests, 1)))
    run_once(engine, make_requests(min(args.requests, 16), args.max_tokens, "warm-up"), False, args.scrape_interval)
    runs = {True: [], False: []}
    for round_ in range(args.rounds):
        for metrics in ((True, False) if round_ % 2 == 0 else (False, True)):
            rate, tokens, scrapes = run_once(engine, make_requests(args.requests, args.max_tokens, f"r{round_}-{metrics}"),
                                             metrics, args.scrape_interval)
            runs[metrics].append(rate)
            print(f"round {round_ + 1}, metrics {'on ' if metrics else 'off'}: {tokens} tokens, {rate:,.0f} tokens/s"
                  + (f", {scrapes} scrapes" if metrics else ""), flush=True)
    on, off = statistics.median(runs[True]), statistics.median(runs[False])
    ratio = on / off
    print(f"median tokens/s: on {on:,.0f}, off {off:,.0f}; ratio {ratio:.3f} (goal >= {GOAL})")
    save("metrics_overhead", {
        "bench": "metrics_overhead", "model": args.model, "requests": args.requests, "max_tokens": args.max_tokens,
        "rounds": args.rounds, "scrape_interval_s": args.scrape_interval,
        "tokens_per_s_on": [round(rate, 1) for rate in runs[True]],
        "tokens_per_s_off": [round(rate, 1) for rate in runs[False]],
        "median_on": round(on, 1), "median_off": round(off, 1), "ratio": round(ratio, 4), "goal": GOAL,
        "meets_goal": ratio >= GOAL,
    })


if __name__ == "__main__":
    main()
