"""Structured answers and results downloads, on one worker.

(1) The same rows as a batch without a constraint and with one (an enum-only
    json_schema, or --constraint choice), one after the other on the same
    worker: completion tokens per second of each, and their ratio.
(2) A finished batch of --download-rows rows (uploaded, then marked done in
    the database with a text and a parsed answer, to save generating them),
    downloaded as CSV and as xlsx: seconds, bytes and the web process's peak
    RSS (VmHWM of `serve` and its children, reset before each download where
    the kernel allows).

The figures are one JSON object on the last line.
"""

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sqlalchemy import func, select, update  # noqa: E402

from bench.fairness import Service  # noqa: E402
from bench.results import save  # noqa: E402
from bench.throughput import CACHE  # noqa: E402
from queue_engine.models import Job  # noqa: E402
from tests.helpers import stop_process  # noqa: E402
from workers.engine import resolve_model_dir  # noqa: E402

SCHEMA = {"type": "object", "properties": {"mood": {"enum": ["happy", "sad", "calm"]},
                                           "size": {"enum": ["small", "medium", "big"]}},
          "required": ["mood", "size"], "additionalProperties": False}
CONSTRAINTS = {"json_schema": {"type": "json_schema", "schema": SCHEMA},
               "choice": {"type": "choice", "choices": ["yes", "no", "maybe"]}}


def rows_csv(rows, tag):
    return io.BytesIO(("id,prompt\n" + "".join(
        f"{tag}{i},Item {i}: describe an animal in a few words\n" for i in range(rows))).encode())


def tokens_per_second(service, client, rows, tag, params):
    batch_id = client.submit_batch(rows_csv(rows, tag), service.model, filename=f"{tag}.csv", params=params)["id"]
    service.wait_done(batch_id)
    with service.sessions() as session:
        tokens = session.scalar(select(func.sum(Job.completion_tokens)).where(Job.batch_id == batch_id))
        failed = session.scalar(select(func.count()).select_from(Job).where(
            Job.batch_id == batch_id, Job.status != "succeeded"))
    start, end = service.span(batch_id)
    seconds = (end - start).total_seconds()
    return {"seconds": round(seconds, 2), "completion_tokens": tokens, "tokens_per_s": round(tokens / seconds, 1),
            "failed_rows": failed}


def pids_of(root):
    """``root`` and its descendants."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


def peak_rss_mib(pids):
    peak = 0
    for pid in pids:
        try:
            for line in open(f"/proc/{pid}/status"):
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]))
        except OSError:
            pass
    return round(peak / 1024, 1)


def reset_peaks(pids):
    """Reset each process's VmHWM (Linux: write 5 to clear_refs); False where not allowed."""
    done = True
    for pid in pids:
        try:
            with open(f"/proc/{pid}/clear_refs", "w") as file:
                file.write("5")
        except OSError:
            done = False
    return done


def download(service, client, batch_id, file_format, out_dir):
    pids = pids_of(service.serve.pid)
    reset = reset_peaks(pids)
    path = out_dir / f"results.{file_format}"
    started = time.monotonic()
    with open(path, "wb") as out:
        client.write_results(batch_id, out, file_format)
    return {"seconds": round(time.monotonic() - started, 2), "bytes": path.stat().st_size,
            "web_peak_rss_mib": peak_rss_mib(pids), "peak_reset": reset}


def finished_batch(service, client, rows, response_format):
    """A batch of ``rows`` rows, marked succeeded in the database with a structured answer each."""
    batch_id = client.submit_batch(rows_csv(rows, "d"), service.model, filename="d.csv",
                                   params={"max_tokens": 16, "response_format": response_format})["id"]
    answer = {"mood": "calm", "size": "medium"}
    with service.sessions.begin() as session:
        session.execute(update(Job).where(Job.batch_id == batch_id).values(
            status="succeeded", result_text=json.dumps(answer, separators=(",", ":")), finish_reason="stop",
            prompt_tokens=12, completion_tokens=9, output={"parsed": answer}))
    return batch_id


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=512, help="rows of each generating batch")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--constraint", choices=sorted(CONSTRAINTS), default="json_schema")
    parser.add_argument("--download-rows", type=int, default=100_000)
    parser.add_argument("--model", default="tiny", choices=["tiny", "tiny-large"])
    parser.add_argument("--chunk-rows", type=int, default=64)
    args = parser.parse_args()

    model_dir = resolve_model_dir(args.model, CACHE, log=print)
    figures = {"model": args.model, "rows": args.rows, "max_tokens": args.max_tokens, "constraint": args.constraint}
    with tempfile.TemporaryDirectory() as tmp:
        service = Service(Path(tmp), args.model, model_dir, args.chunk_rows)
        try:
            client = service.client("bench")
            base = {"max_tokens": args.max_tokens, "temperature": 0}
            tokens_per_second(service, client, 32, "w", base)  # warm-up
            print("(1) free text, then constrained ...", flush=True)
            free = tokens_per_second(service, client, args.rows, "f", base)
            constrained = tokens_per_second(service, client, args.rows, "c",
                                            {**base, "response_format": CONSTRAINTS[args.constraint]})
            figures.update(free=free, constrained=constrained,
                           ratio=round(constrained["tokens_per_s"] / free["tokens_per_s"], 3))
            stop_process(service.worker)  # the downloaded batch is made in the database, not generated
            print(f"(2) downloads of {args.download_rows} rows ...", flush=True)
            batch_id = finished_batch(service, client, args.download_rows, CONSTRAINTS["json_schema"])
            figures["download_rows"] = args.download_rows
            figures["csv"] = download(service, client, batch_id, "csv", Path(tmp))
            figures["xlsx"] = download(service, client, batch_id, "xlsx", Path(tmp))
        finally:
            service.stop()
    save("structured", figures)


if __name__ == "__main__":
    main()
