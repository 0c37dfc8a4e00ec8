"""The OpenAI-compatible path, side by side in one run, with the official
``openai`` client against `queue-engine serve` (cluster mode) and one worker:

(a) N concurrent streaming chat clients (``stream: true``): all complete?
    time to first token p50/p99, and tokens/s of the whole run;
(b) vLLM's offline ``LLM.generate`` on the same prompts (the chat template
    applied, as the worker does): tokens/s;
(c) one short synchronous request at a time on the idle worker, request to
    last byte, against (d) the engine's own time for the same request
    (offline ``LLM.generate`` of that one prompt);
(e) the same N clients as (a) without ``stream``: what streaming costs.

CPU seconds of the web, the worker, Redis and the benchmark's own clients
during (a) and (e) are printed too: on a two-core machine they all share
the cores the engine runs on.

Greedy decoding throughout, so every side generates the same tokens. Prints
the figures as one JSON object on its last line.

    python bench/openai_stream.py [--clients 256] [--max-tokens 32] [--model tiny-large]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import openai  # noqa: E402
import psutil  # noqa: E402

from bench.results import save  # noqa: E402
from bench.throughput import CACHE, PYTHON, cluster_env, make_prompts, offline_generate  # noqa: E402
from queue_engine.apikeys import create_api_key  # noqa: E402
from queue_engine.db import make_sessions, transaction  # noqa: E402
from queue_engine.settings import load_settings  # noqa: E402
from tests.helpers import RedisServer, free_port, stop_process, wait_until_serving  # noqa: E402
from workers.engine import resolve_model_dir  # noqa: E402

SHORT = "Say hello."


def chat(prompt):
    return [{"role": "user", "content": prompt}]


def chat_prompts(model_dir, prompts):
    """The prompts as the worker gives them to the engine: through the model's chat template."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return [tokenizer.apply_chat_template(chat(p), tokenize=False, add_generation_prompt=True) for p in prompts]


def ask_one(client, model, prompt, max_tokens):
    """One client without ``stream``: ``{started, ended, completion_tokens}``."""
    started = time.perf_counter()
    answer = client.chat.completions.create(model=model, messages=chat(prompt), max_tokens=max_tokens, temperature=0)
    return {"started": started, "ended": time.perf_counter(), "completion_tokens": answer.usage.completion_tokens}


def stream_one(client, model, prompt, max_tokens):
    """One streaming client: ``{ttft_s, total_s, completion_tokens}``."""
    started = time.perf_counter()
    first = None
    usage = None
    for chunk in client.chat.completions.create(model=model, messages=chat(prompt), max_tokens=max_tokens,
                                                temperature=0, stream=True, stream_options={"include_usage": True}):
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter()
        if chunk.usage is not None:
            usage = chunk.usage
    ended = time.perf_counter()
    return {"started": started, "ended": ended, "ttft_s": (first or ended) - started,
            "completion_tokens": usage.completion_tokens if usage else 0}


def percentile(values, fraction):
    values = sorted(values)
    return values[min(len(values) - 1, int(fraction * len(values)))]


def cpu_seconds(processes):
    return {name: sum(process.cpu_times()[:2]) for name, process in processes.items()}


def concurrently(client, model, prompts, max_tokens, one, processes):
    """Every prompt at once, one thread each: ``(results, CPU seconds per process)``."""
    before = cpu_seconds(processes)
    with ThreadPoolExecutor(len(prompts)) as pool:
        results = list(pool.map(lambda p: one(client, model, p, max_tokens), prompts))
    after = cpu_seconds(processes)
    return results, {name: round(after[name] - before[name], 1) for name in processes}


def rate(results):
    elapsed = max(r["ended"] for r in results) - min(r["started"] for r in results)
    return sum(r["completion_tokens"] for r in results) / elapsed


def run_service(env, settings, model, prompts, max_tokens, single_repeats, tmp, redis):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    serve = subprocess.Popen([PYTHON, "-m", "queue_engine.cli", "--log-level", "WARNING", "serve", "--port", str(port)],
                             env={**os.environ, **env}, cwd=ROOT, stdout=open(tmp / "serve.log", "w"),
                             stderr=subprocess.STDOUT)
    worker = subprocess.Popen([PYTHON, "-m", "queue_engine.cli", "--log-level", "WARNING", "worker", "--model", model],
                              env={**os.environ, **env}, cwd=ROOT, stdout=open(tmp / "worker.log", "w"),
                              stderr=subprocess.STDOUT)
    try:
        wait_until_serving(url, serve, tmp / "serve.log", 120)
        with transaction(make_sessions(settings.sqlalchemy_url)) as session:
            key = create_api_key(session, f"bench-{time.time_ns()}").key
        client = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=1800)
        client.chat.completions.create(model=model, messages=chat("warm up"), max_tokens=4)  # waits for the worker
        singles = []
        for _ in range(single_repeats):
            started = time.perf_counter()
            client.chat.completions.create(model=model, messages=chat(SHORT), max_tokens=8, temperature=0)
            singles.append(time.perf_counter() - started)
        processes = {"web": psutil.Process(serve.pid), "worker": psutil.Process(worker.pid),
                     "redis": psutil.Process(redis.process.pid), "clients": psutil.Process()}
        streams = concurrently(client, model, prompts, max_tokens, stream_one, processes)
        whole = concurrently(client, model, prompts, max_tokens, ask_one, processes)
    finally:
        stop_process(worker)
        stop_process(serve)
    return streams, whole, singles


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--single-repeats", type=int, default=20)
    parser.add_argument("--model", default="tiny-large", choices=["tiny", "tiny-large"])
    args = parser.parse_args()

    model_dir = resolve_model_dir(args.model, CACHE, log=print)
    prompts = make_prompts(args.clients)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        prompts_file, single_file = tmp / "prompts.json", tmp / "single.json"
        prompts_file.write_text(json.dumps(chat_prompts(model_dir, prompts)))
        single_file.write_text(json.dumps(chat_prompts(model_dir, [SHORT])))
        redis = RedisServer(tmp)
        env = cluster_env(tmp, redis.url, args.model, model_dir, max(256, args.clients))
        # A streaming request holds a web thread from start to end.
        env["QUEUE_ENGINE_WEB_THREADS"] = str(args.clients + 32)
        settings = load_settings(environ=env)
        try:
            print(f"(b) offline LLM.generate, {args.clients} prompts x {args.max_tokens} tokens ...", flush=True)
            offline = offline_generate(model_dir, prompts_file, args.max_tokens, max(256, args.clients))
            print(f"(d) offline LLM.generate of one short prompt, {args.single_repeats} times ...", flush=True)
            engine_single = offline_generate(model_dir, single_file, 8, 256, repeats=args.single_repeats)
            print(f"(c) then (a): {args.single_repeats} synchronous requests, then {args.clients} streaming "
                  "clients at once ...", flush=True)
            (streams, stream_cpu), (whole, whole_cpu), singles = run_service(
                env, settings, args.model, prompts, args.max_tokens, args.single_repeats, tmp, redis)
        finally:
            redis.stop()

    completed = [s for s in streams if s["completion_tokens"] > 0]
    offline_rate = offline["completion_tokens"] / offline["elapsed_s"]
    ttft = [s["ttft_s"] for s in streams]
    sync_s = statistics.median(singles)
    engine_s = statistics.median(engine_single["each_s"])
    figures = {
        "benchmark": "openai_stream",
        "model": args.model,
        "clients": args.clients,
        "max_tokens": args.max_tokens,
        "completed": len(completed),
        "ttft_p50_s": round(percentile(ttft, 0.5), 3),
        "ttft_p99_s": round(percentile(ttft, 0.99), 3),
        "stream_tokens_per_s": round(rate(streams), 1),
        "unstreamed_tokens_per_s": round(rate(whole), 1),
        "offline_tokens_per_s": round(offline_rate, 1),
        "ratio_stream_vs_offline": round(rate(streams) / offline_rate, 3),
        "ratio_unstreamed_vs_offline": round(rate(whole) / offline_rate, 3),
        "ratio_stream_vs_unstreamed": round(rate(streams) / rate(whole), 3),
        "cpu_s_streamed": stream_cpu,
        "cpu_s_unstreamed": whole_cpu,
        "sync_request_s_p50": round(sync_s, 4),
        "engine_request_s_p50": round(engine_s, 4),
        "sync_overhead_ms": round(1000 * (sync_s - engine_s), 1),
        "ratio_sync_vs_engine": round(sync_s / engine_s, 2),
    }
    save("openai_stream", figures)


if __name__ == "__main__":
    main()
