"""Batches through real Redis, a real `queue-engine worker` and vLLM on the tiny model."""

import csv
import io
import json
import os
import subprocess

import pytest
from sqlalchemy import func, select

from queue_engine.models import Job
from tests.helpers import queue_engine_command, wait_until

pytestmark = pytest.mark.integration



def csv_file(rows, header=("id", "prompt")):
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    return io.BytesIO(buffer.getvalue().encode())


def results_table(client, batch_id, file_format="csv"):
    out = io.BytesIO()
    client.write_results(batch_id, out, file_format)
    text = out.getvalue().decode()
    if file_format == "jsonl":
        return [json.loads(line) for line in text.splitlines()]
    return list(csv.DictReader(io.StringIO(text)))


def test_a_2000_row_csv_runs_end_to_end(cluster):
    client = cluster.new_client()
    worker = cluster.workers[0]
    finished_before = worker.metric("qe_engine_requests_total", outcome="finished")
    rows = [(f"row-{i:04}", f"Question {i}: what comes after {i}?" if i % 250 else "") for i in range(2000)]
    rows[7] = ("=HYPERLINK(\"x\")", "A formula-looking id")
    batch = client.submit_batch(csv_file(rows), "tiny", filename="questions.csv",
                                params={"max_tokens": 4, "temperature": 0})
    assert batch["request_counts"] == {"total": 2000, "completed": 0, "failed": 8, "cancelled": 0}

    done = client.wait_for_batch(batch["id"], timeout=600)
    assert done["status"] == "completed"
    assert done["request_counts"] == {"total": 2000, "completed": 1992, "failed": 8, "cancelled": 0}
    assert done["completed_at"] is not None

    table = results_table(client, batch["id"])
    assert [row["id"] for row in table] == ["'" + rows[7][0] if i == 7 else rows[i][0] for i in range(2000)]
    failed = [row for row in table if row["status"] == "failed"]
    assert [row["id"] for row in failed] == [f"row-{i:04}" for i in range(0, 2000, 250)]
    assert all(row["error"] == "empty_prompt: the prompt is empty" for row in failed)
    succeeded = [row for row in table if row["status"] == "succeeded"]
    assert len(succeeded) == 1992
    assert all(row["text"] and 1 <= int(row["completion_tokens"]) <= 4 and int(row["prompt_tokens"]) > 0
               for row in succeeded)
    # Every row ran once: the engine finished exactly one request per row.
    assert worker.metric("qe_engine_requests_total", outcome="finished") - finished_before == 1992


def test_an_openai_batch_jsonl_file_runs_with_its_per_line_parameters(cluster):
    client = cluster.new_client()
    lines = [
        {"custom_id": "chat", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "tiny", "messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 2}},
        {"custom_id": "plain", "method": "POST", "url": "/v1/completions",
         "body": {"model": "tiny", "prompt": "Once upon a time", "temperature": 0}},
        {"custom_id": "empty", "method": "POST", "url": "/v1/chat/completions",
         "body": {"messages": [{"role": "user", "content": ""}]}},
    ]
    data = io.BytesIO("\n".join(json.dumps(line) for line in lines).encode())
    batch = client.submit_batch(data, "tiny", filename="requests.jsonl", params={"max_tokens": 6})
    done = client.wait_for_batch(batch["id"], timeout=120)
    assert done["request_counts"] == {"total": 3, "completed": 2, "failed": 1, "cancelled": 0}
    items = {item["custom_id"]: item for item in results_table(client, batch["id"], "jsonl")}
    assert list(items) == ["chat", "plain", "empty"]
    assert items["chat"]["status"] == "succeeded" and items["chat"]["usage"]["completion_tokens"] <= 2
    assert items["plain"]["status"] == "succeeded" and items["plain"]["usage"]["completion_tokens"] <= 6
    assert items["empty"]["error"]["code"] == "empty_prompt"


def test_cancel_mid_run_keeps_finished_rows_and_counts_add_up(cluster):
    client = cluster.new_client()
    rows = [(str(i), f"Write a long story about the number {i}.") for i in range(3000)]
    batch = client.submit_batch(csv_file(rows), "tiny", params={"max_tokens": 32})
    wait_until(lambda: client.get_batch(batch["id"])["request_counts"]["completed"] > 0, 120, "some rows to finish")

    cancelling = client.cancel_batch(batch["id"])
    assert cancelling["status"] in ("cancelling", "cancelled")
    assert cancelling["request_counts"]["cancelled"] > 0

    done = client.wait_for_batch(batch["id"], timeout=120)
    counts = done["request_counts"]
    assert done["status"] == "cancelled"
    assert counts["completed"] + counts["failed"] + counts["cancelled"] == counts["total"] == 3000
    assert counts["completed"] > 0 and counts["cancelled"] > 0
    statuses = [row["status"] for row in results_table(client, batch["id"])]
    assert statuses.count("succeeded") == counts["completed"]
    assert statuses.count("cancelled") == counts["cancelled"]
    assert set(statuses) <= {"succeeded", "cancelled"}


def test_an_interactive_job_overtakes_a_bulk_backlog(cluster):
    """An interactive job submitted behind thousands of bulk rows ends while
    nearly all of them are still waiting: it does not queue behind them."""
    client = cluster.new_client()
    rows = [(str(i), f"Tell me everything about the number {i}.") for i in range(5000)]
    batch = client.submit_batch(csv_file(rows), "tiny", params={"max_tokens": 64})
    wait_until(lambda: rows_in(cluster, batch["id"], "running") > 0, 60, "the bulk rows to be running")

    job = client.submit_job({"model": "tiny", "prompt": "Are you there?", "params": {"max_tokens": 4}})
    job = client.wait_for_job(job["id"], timeout=120)
    still_waiting = rows_in(cluster, batch["id"], "queued")

    assert job["status"] == "succeeded"
    assert still_waiting > 4000, "the interactive job finished while the backlog was still there"
    client.cancel_batch(batch["id"])
    client.wait_for_batch(batch["id"], timeout=120)


def test_a_single_job_with_bulk_priority_runs(cluster):
    client = cluster.new_client()
    job = client.submit_job({"model": "tiny", "prompt": "Slowly, please", "priority": "bulk",
                             "params": {"max_tokens": 3}})
    done = client.wait_for_job(job["id"], timeout=60)
    assert (done["status"], done["priority"]) == ("succeeded", "bulk")


def rows_in(cluster, batch_id, status):
    with cluster.sessions() as session:
        return session.scalar(select(func.count(Job.id)).where(Job.batch_id == batch_id, Job.status == status))


def test_the_cli_submits_a_file_waits_with_progress_and_writes_the_results(cluster, tmp_path):
    client = cluster.new_client()
    source = tmp_path / "prompts.csv"
    source.write_text("id,prompt\n" + "".join(f"q{i},Count to {i}\n" for i in range(40)))
    env = {"QUEUE_ENGINE_URL": cluster.url, "QUEUE_ENGINE_API_KEY": client.session.headers["Authorization"][7:]}

    submitted = run_cli(["submit", str(source), "--model", "tiny", "--max-tokens", "3", "--wait"], env)
    batch_id, summary = submitted.stdout.split()[0], submitted.stdout.strip().splitlines()[-1]
    assert batch_id.startswith("batch_")
    assert summary == f"{batch_id} completed: 40/40 rows ended (40 completed, 0 failed, 0 cancelled)"
    assert "40/40" in submitted.stderr, "a progress bar on stderr"

    assert run_cli(["status", batch_id], env).stdout.strip() == summary
    out = tmp_path / "results.csv"
    run_cli(["results", batch_id, "-o", str(out)], env)
    table = list(csv.DictReader(out.open()))
    assert [row["id"] for row in table] == [f"q{i}" for i in range(40)]
    assert {row["status"] for row in table} == {"succeeded"}


def run_cli(args, env):
    result = subprocess.run([queue_engine_command(), *args], env={**os.environ, **env},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result
