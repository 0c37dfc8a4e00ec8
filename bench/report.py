"""Plots of the saved benchmark figures, as PNGs for the README.

Reads ``<results>/<name>.json`` (written by each benchmark through
``bench/results.py``) and writes, with matplotlib:

- ``throughput.png``: tokens/s of the service, vLLM offline and the naive
  worker (bench/throughput.py), the ratios labelled;
- ``latency-concurrency.png``: request -> result latency p50/p95 against
  concurrency 1..256 on a log2 axis, tokens/s on a second axis
  (bench/concurrency.py), as in the seed paper's latency figure;
- ``scale-out-timeline.png``: backlog, rows done and worker jobs by state
  over time (bench/scale_out.py).

A plot whose results file is missing is skipped with a message.

    python bench/report.py [--results bench/results] [--out docs/img]
"""

import argparse
import json
import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display here, nor on a build machine

import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.results import RESULTS  # noqa: E402

#: Allocation states in the order they happen, and their colours.
WORKER_STATES = {"pending": "#c7c7c7", "starting": "#ffbb78", "serving": "#2ca02c", "stopping": "#d62728"}


def save_figure(fig, path):
    # No "Software" stamp: a rerun with another matplotlib should not change committed images.
    fig.savefig(path, dpi=120, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)


def plot_throughput(figures, path):
    """Bars of tokens/s: vLLM offline, the service, the naive worker."""
    bars = [("vLLM offline\nLLM.generate", figures["offline_tokens_per_s"], "#7f7f7f"),
            ("queue-engine\nHTTP + Redis + worker", figures["service_tokens_per_s"], "#1f77b4"),
            ("naive worker\none prompt per call", figures["naive_tokens_per_s"], "#ff7f0e")]
    bars = [bar for bar in bars if bar[1] is not None and not math.isnan(bar[1])]
    fig, ax = plt.subplots(figsize=(7, 4))
    drawn = ax.bar([label for label, _, _ in bars], [value for _, value, _ in bars],
                   color=[colour for _, _, colour in bars])
    ax.bar_label(drawn, labels=[f"{value:,.0f}" for _, value, _ in bars], padding=3)
    ratios = [f"service / offline = {figures['ratio_service_vs_offline']:.2f}"]
    if not math.isnan(figures.get("ratio_service_vs_naive", math.nan)):
        ratios.append(f"service / naive = {figures['ratio_service_vs_naive']:.1f}x")
    ax.text(0.98, 0.95, "\n".join(ratios), transform=ax.transAxes, ha="right", va="top",
            bbox={"boxstyle": "round", "facecolor": "white", "edgecolor": "#cccccc"})
    ax.set_ylabel("completion tokens / s")
    ax.set_ylim(0, max(value for _, value, _ in bars) * 1.25)
    ax.set_title(f"Throughput: {figures['prompts']} single jobs x {figures['max_tokens']} tokens, "
                 f"model {figures['model']}")
    save_figure(fig, path)


def plot_concurrency(figures, path):
    """Latency p50/p95 against concurrency (log2 axis), tokens/s on the right axis."""
    levels = figures["levels"]
    x = [level["concurrency"] for level in levels]
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, style in (("p50", "o-"), ("p95", "s--")):
        ax.plot(x, [level["request_to_result_s"][name] for level in levels], style, color="#1f77b4",
                label=f"latency {name} (request -> result)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(x, [str(c) for c in x])
    ax.set_xlabel("concurrent clients (one single job each at a time)")
    ax.set_ylabel("latency, s")
    ax.set_ylim(bottom=0)
    rate = ax.twinx()
    rate.plot(x, [level["tokens_per_s"] for level in levels], "^:", color="#ff7f0e", label="throughput")
    rate.set_ylabel("completion tokens / s")
    rate.set_ylim(bottom=0)
    lines = ax.get_legend_handles_labels()[0] + rate.get_legend_handles_labels()[0]
    ax.legend(lines, [line.get_label() for line in lines], loc="upper left")
    ax.set_title(f"Latency against concurrency: {figures['max_tokens']} tokens per job, "
                 f"model {figures['model']}")
    save_figure(fig, path)


def plot_scale_out(figures, path):
    """Backlog and rows done over time above, worker jobs by state below."""
    timeline = figures["timeline"]
    t = [point["t_s"] for point in timeline]
    fig, (rows, workers) = plt.subplots(2, 1, figsize=(8, 5), sharex=True, height_ratios=[2, 1])
    rows.plot(t, [point["backlog"] for point in timeline], color="#d62728", label="backlog (requests)")
    rows.plot(t, [point["rows_done"] for point in timeline], color="#1f77b4", label="rows done")
    rows.set_ylabel("rows")
    rows.set_ylim(bottom=0)
    rows.legend(loc="best")
    states = [state for state in WORKER_STATES if any(point["workers"].get(state) for point in timeline)]
    workers.stackplot(t, [[point["workers"].get(state, 0) for point in timeline] for state in states],
                      labels=states, colors=[WORKER_STATES[state] for state in states], step="post")
    workers.set_ylabel("worker jobs")
    workers.set_xlabel("seconds")
    workers.yaxis.get_major_locator().set_params(integer=True)
    workers.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")
    rows.set_title(f"Scale-out on a one-node SLURM cluster: {figures.get('batches', '?')} batch(es) of "
                   f"{figures.get('rows', '?')} rows, idle_grace {figures['idle_grace_s']} s")
    save_figure(fig, path)


#: What each plot reads and writes: (results name, PNG name, plotting function).
PLOTS = [("throughput", "throughput.png", plot_throughput),
         ("concurrency", "latency-concurrency.png", plot_concurrency),
         ("scale_out", "scale-out-timeline.png", plot_scale_out)]


def write_report(results, out, echo=print):
    """Write every plot whose results file is in ``results`` into ``out``.

    Returns:
        The PNGs written.
    """
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, png, plot in PLOTS:
        source = results / f"{name}.json"
        if not source.exists():
            echo(f"skipping {png}: no {source} (run bench/{name}.py)")
            continue
        plot(json.loads(source.read_text()), out / png)
        echo(f"wrote {out / png}")
        written.append(out / png)
    return written


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=RESULTS, help="the saved JSON files")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img", help="where the PNGs go")
    args = parser.parse_args(argv)
    write_report(args.results, args.out)


if __name__ == "__main__":
    main()
