"""Offline baseline: vLLM's own ``LLM.generate`` on all prompts in one call.

Run as a subprocess by ``throughput.py``; prints one JSON object.
"""

import argparse
import json
import time

from workers.engine import configure_vllm_environment


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--prompts", required=True, help="a JSON file with a list of prompts")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=1,
                        help="generate the prompts this many times; each_s lists every run's seconds")
    args = parser.parse_args()
    configure_vllm_environment()
    from vllm import LLM, SamplingParams

    prompts = json.load(open(args.prompts))
    llm = LLM(model=args.model_dir, dtype="float32", enforce_eager=True, max_model_len=512,
              max_num_seqs=args.max_num_seqs, seed=0)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0)
    llm.generate(prompts[:8], params, use_tqdm=False)  # warm-up, as the worker's first job is
    each = []
    for _ in range(args.repeats):
        started, cpu_started = time.perf_counter(), time.process_time()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
        each.append(elapsed)
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    print(json.dumps({"elapsed_s": elapsed, "cpu_s": cpu, "completion_tokens": tokens, "each_s": each}))


if __name__ == "__main__":
    main()
