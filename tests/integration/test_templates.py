"""A CSV batch built from a template over its columns, with a system message and
per-row parameters from a column, through a real worker and vLLM on the tiny model."""

import csv
import io

import pytest
from sqlalchemy import select

from queue_engine.models import Job

pytestmark = pytest.mark.integration


def test_a_template_batch_runs_end_to_end(cluster):
    """The dry run counts with the tiny model's tokenizer; the upload runs each filled row as chat messages."""
    client = cluster.new_client()
    buffer = io.StringIO()
    csv.writer(buffer).writerows([("id", "title", "topic", "budget"), ("a", "Lists", "Python", "3"),
                                  ("b", "Dicts", "", "2"), ("c", "Loops", "Python", "")])
    data = buffer.getvalue().encode()
    fields = {"template": "Title: {title}\nTopic: {topic}\nSummarise.", "system": "Be brief.",
              "params_columns": {"max_tokens": "budget"}, "keep_columns": True}
    preview = client.submit_batch(io.BytesIO(data), "tiny", filename="papers.csv", dry_run=True,
                                  params={"max_tokens": 4, "temperature": 0}, **fields)
    assert (preview["rows"], preview["runnable_rows"], preview["tokens_counted_with"]) == (3, 2, "tokenizer")
    assert preview["prompt_tokens"] > 0
    batch = client.submit_batch(io.BytesIO(data), "tiny", filename="papers.csv",
                                params={"max_tokens": 4, "temperature": 0}, **fields)
    done = client.wait_for_batch(batch["id"], timeout=300)
    assert done["request_counts"] == {"total": 3, "completed": 2, "failed": 1, "cancelled": 0}
    with cluster.sessions() as session:
        rows = session.execute(select(Job.custom_id, Job.status, Job.messages, Job.params, Job.completion_tokens,
                                      Job.error_code, Job.cells)
                               .where(Job.batch_id == batch["id"]).order_by(Job.row_index)).all()
    assert rows[0].messages[1]["content"] == "Title: Lists\nTopic: Python\nSummarise."
    assert (rows[0].status, rows[0].params) == ("succeeded", {"max_tokens": 3})
    assert 1 <= rows[0].completion_tokens <= 3
    assert (rows[1].status, rows[1].error_code) == ("failed", "empty_cell")
    assert rows[2].status == "succeeded" and rows[2].completion_tokens <= 4
    assert rows[2].cells == {"id": "c", "title": "Loops", "topic": "Python", "budget": ""}
