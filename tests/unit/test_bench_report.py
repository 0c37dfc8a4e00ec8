"""bench/report.py: saved benchmark figures in, PNGs out."""

import json

from bench.report import main, write_report
from bench.results import save

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

THROUGHPUT = {"benchmark": "throughput", "model": "tiny-large", "prompts": 512, "max_tokens": 32,
              "service_tokens_per_s": 2100.5, "offline_tokens_per_s": 3400.2, "naive_tokens_per_s": 180.3,
              "ratio_service_vs_offline": 0.618, "ratio_service_vs_naive": 11.65}

CONCURRENCY = {"benchmark": "concurrency", "model": "tiny-large", "max_tokens": 32, "jobs_per_client": None,
               "duration_s": 20, "levels": [
                   {"concurrency": c, "jobs": 10 * c, "failed": 0, "seconds": 20.0, "jobs_per_s": c / (0.2 + c / 40),
                    "tokens_per_s": 32 * c / (0.2 + c / 40),
                    "request_to_result_s": {"p50": 0.2 + c / 40, "p95": 0.3 + c / 30, "p99": 0.4 + c / 25},
                    "latency_s": {"p50": 0.1 + c / 40, "p95": 0.2 + c / 30, "p99": 0.3 + c / 25},
                    "queue_wait_s": {"p50": 0.01, "p95": 0.02, "p99": 0.03}}
                   for c in (1, 2, 4, 8, 16, 32, 64, 128, 256)]}


def scale_out_timeline():
    """Two workers start, serve 600 rows, stop: one point every 0.5 s."""
    points = []
    for step in range(120):
        t = step / 2
        state = "pending" if t < 2 else "starting" if t < 8 else "serving" if t < 40 else "stopping" if t < 46 else None
        done = 0 if t < 10 else min(600, int((t - 10) * 30))
        points.append({"t_s": t, "backlog": 600 - done, "rows_done": done, "workers": {state: 2} if state else {}})
    return points


SCALE_OUT = {"database": "sqlite", "idle_grace_s": 5, "batches": 1, "rows": 600, "timeline": scale_out_timeline()}


def write_results(directory, **figures):
    directory.mkdir(parents=True, exist_ok=True)
    for name, value in figures.items():
        (directory / f"{name}.json").write_text(json.dumps(value))


def is_png(path):
    return path.read_bytes()[:8] == PNG_SIGNATURE and path.stat().st_size > 10_000


def test_report_writes_a_png_for_each_results_file(tmp_path):
    """Throughput, latency against concurrency and the scale-out timeline each become a PNG."""
    write_results(tmp_path / "results", throughput=THROUGHPUT, concurrency=CONCURRENCY, scale_out=SCALE_OUT)
    written = write_report(tmp_path / "results", tmp_path / "img", echo=lambda line: None)
    assert [path.name for path in written] == ["throughput.png", "latency-concurrency.png", "scale-out-timeline.png"]
    assert all(is_png(path) for path in written)


def test_report_skips_a_missing_results_file_with_a_message(tmp_path, capsys):
    """Without concurrency.json and scale_out.json the throughput plot is still written; the others are named."""
    write_results(tmp_path / "results", throughput=THROUGHPUT)
    main(["--results", str(tmp_path / "results"), "--out", str(tmp_path / "img")])
    assert [path.name for path in (tmp_path / "img").iterdir()] == ["throughput.png"]
    out = capsys.readouterr().out
    assert "skipping latency-concurrency.png: no " in out and "run bench/concurrency.py" in out
    assert "skipping scale-out-timeline.png" in out


def test_report_plots_throughput_without_the_naive_run(tmp_path):
    """--skip-naive leaves NaN for the naive worker: two bars, no crash."""
    skipped = {**THROUGHPUT, "naive_tokens_per_s": float("nan"), "ratio_service_vs_naive": float("nan")}
    write_results(tmp_path / "results", throughput=skipped)
    [written] = write_report(tmp_path / "results", tmp_path / "img", echo=lambda line: None)
    assert is_png(written)


def test_save_writes_the_results_file_and_prints_the_figures_last(tmp_path, capsys):
    """save() keeps the benchmarks' contract: the JSON object is the last line printed."""
    path = save("throughput", THROUGHPUT, directory=tmp_path)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == THROUGHPUT
    stored = json.loads(path.read_text())
    assert path == tmp_path / "throughput.json" and stored["measured_at"] and stored["model"] == "tiny-large"
