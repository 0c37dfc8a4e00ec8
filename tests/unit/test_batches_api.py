"""The batches API over the Flask test client, with a fakeredis broker: uploads,
refusals that leave nothing behind, chunked dispatch, results, cancel.

Running rows through real workers is in ``tests/integration/test_batches.py``.
"""

import base64
import csv
import io
import json

import pytest
from sqlalchemy import func, select

from queue_engine import keys
from queue_engine.models import Batch, BatchChunk, Job
from tests.conftest import make_key
from tests.helpers import assert_matches_openapi

BULK = keys.queue_name("tiny", "bulk")


def upload(client, auth, data, filename="rows.csv", **fields):
    data = data.encode() if isinstance(data, str) else data
    form = {"model": "tiny", **fields, "file": (io.BytesIO(data), filename)}
    return client.post("/api/v1/batches", data=form, headers=auth, content_type="multipart/form-data")


def csv_text(rows, header=("id", "prompt")):
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def chunk_messages(broker):
    """The bodies of the bulk lane's messages, oldest first."""
    raw = reversed(broker.lrange(BULK, 0, -1))
    return [json.loads(base64.b64decode(json.loads(item)["body"])) for item in raw]


def stored(app):
    with app.extensions["qe_sessions"]() as session:
        return session.scalar(select(func.count(Batch.id))), session.scalar(select(func.count(Job.id)))


def test_an_upload_stores_every_row_in_chunks_for_the_dispatcher(make_app, auth_for, broker, spec):
    app = make_app(batches={"chunk_rows": 4})
    client, auth = app.test_client(), auth_for(app)
    response = upload(client, auth, csv_text([(f"r{i}", f"prompt {i}") for i in range(10)] + [("r10", "  ")]))
    assert response.status_code == 202, response.get_json()
    batch = assert_matches_openapi(spec, "/api/v1/batches", "post", response)
    assert response.headers["Location"].endswith(f"/api/v1/batches/{batch['id']}")
    assert batch["status"] == "in_progress"
    assert batch["request_counts"] == {"total": 11, "completed": 0, "failed": 1, "cancelled": 0}
    assert (batch["format"], batch["filename"], batch["model"]) == ("csv", "rows.csv", "tiny")
    # 10 runnable rows in chunks of 4: three chunks, not eleven, left for the
    # dispatcher to send by fair share (the upload sends none itself).
    assert chunk_messages(broker) == []
    with app.extensions["qe_sessions"]() as session:
        states = session.execute(select(BatchChunk.chunk, BatchChunk.state)
                                 .where(BatchChunk.batch_id == batch["id"]).order_by(BatchChunk.chunk)).all()
    assert [tuple(state) for state in states] == [(0, "pending"), (1, "pending"), (2, "pending")]
    with app.extensions["qe_sessions"]() as session:
        rows = session.execute(select(Job.row_index, Job.custom_id, Job.status, Job.chunk, Job.lane, Job.kind)
                               .where(Job.batch_id == batch["id"]).order_by(Job.row_index)).all()
    assert [r.custom_id for r in rows] == [f"r{i}" for i in range(11)]
    assert {(r.lane, r.kind) for r in rows} == {("bulk", "batch_item")}
    assert rows[10].status == "failed" and rows[10].chunk is None
    assert sorted(r.chunk for r in rows[:10]) == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]


def test_rows_that_share_a_prefix_are_sent_in_the_same_chunks(make_app, auth_for, broker):
    app = make_app(batches={"chunk_rows": 3})
    client, auth = app.test_client(), auth_for(app)
    templates = ["Translate into French: ", "Summarise in one line: "]
    rows = [(str(i), templates[i % 2] + f"text number {i}") for i in range(12)]
    batch = upload(client, auth, csv_text(rows)).get_json()
    with app.extensions["qe_sessions"]() as session:
        chunks = session.execute(select(Job.chunk, Job.prompt).where(Job.batch_id == batch["id"])).all()
    prefixes_per_chunk = {}
    for chunk, prompt in chunks:
        prefixes_per_chunk.setdefault(chunk, set()).add(prompt.split(":")[0])
    assert len(prefixes_per_chunk) == 4
    assert all(len(prefixes) == 1 for prefixes in prefixes_per_chunk.values())


def test_a_jsonl_upload_in_openai_batch_format(client, auth, broker):
    lines = [
        {"custom_id": "q1", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}},
        {"custom_id": "q2", "method": "POST", "url": "/v1/completions", "body": {"model": "tiny", "prompt": "once"}},
    ]
    response = upload(client, auth, "\n".join(json.dumps(line) for line in lines), filename="requests.jsonl",
                      params='{"max_tokens": 7, "temperature": 0}')
    assert response.status_code == 202, response.get_json()
    batch = response.get_json()
    assert batch["format"] == "jsonl"
    assert batch["params"]["max_tokens"] == 7 and batch["params"]["temperature"] == 0
    assert batch["request_counts"]["total"] == 2
    results = client.get(f"/api/v1/batches/{batch['id']}/results?format=jsonl", headers=auth)
    items = [json.loads(line) for line in results.get_data(as_text=True).splitlines()]
    assert [(item["custom_id"], item["status"]) for item in items] == [("q1", "queued"), ("q2", "queued")]


MALFORMED = [
    pytest.param({"data": 'id,prompt\n1,ok\n2,"bad"quote\n'}, 400, "line 3", id="broken quoting"),
    pytest.param({"data": b"id,prompt\n1,caf\xe9\n"}, 400, "line 2", id="not utf-8"),
    pytest.param({"data": "id,prompt\n1,a\n1,b\n"}, 400, "duplicate id", id="duplicate ids"),
    pytest.param({"data": "id,question\n1,a\n"}, 400, "no column 'prompt'", id="no prompt column"),
    pytest.param({"data": "id,prompt\n"}, 400, "no rows", id="header only"),
    pytest.param({"data": "", "filename": "empty.csv"}, 400, "empty", id="empty file"),
    pytest.param({"data": b"\x89PNG\r\n\x1a\n\x00\x00", "filename": "picture"}, 400, "binary", id="binary"),
    pytest.param({"data": '{"custom_id": "a", "body": {"prompt": "x"}}\nnot json\n', "filename": "x.jsonl"},
                 400, "line 2", id="jsonl line not json"),
    pytest.param({"data": "prompt\n" + "x\n" * 6}, 400, "more than 5 rows", id="over max_rows"),
    pytest.param({"data": "prompt\n" + "x" * 3000 + "\n"}, 413, "larger than", id="over max_bytes"),
    pytest.param({"data": "prompt\nx\n", "params": "{max_tokens: 3}"}, 400, "params: not valid JSON", id="params"),
    pytest.param({"data": "prompt\nx\n", "params": '{"max_tokens": 0}'}, 400, "params.max_tokens", id="param value"),
    pytest.param({"data": "prompt\nx\n", "model": "nope"}, 400, "model", id="unknown model"),
    pytest.param({"data": "prompt\nx\n", "colour": "blue"}, 400, "colour", id="unknown field"),
    pytest.param({"data": "prompt\nx\n", "webhook_url": "file:///etc/passwd"}, 400, "webhook_url", id="webhook"),
]


@pytest.mark.parametrize("fields, status, words", MALFORMED)
def test_a_malformed_upload_is_refused_whole_and_leaves_nothing(make_app, auth_for, broker, fields, status, words):
    app = make_app(batches={"max_rows": 5, "max_bytes": 2048})
    client, auth = app.test_client(), auth_for(app)
    response = upload(client, auth, **fields)
    assert response.status_code == status
    assert words in response.get_json()["error"]["message"]
    assert stored(app) == (0, 0)
    assert broker.llen(BULK) == 0


def test_an_upload_without_a_file_says_so(client, auth):
    response = client.post("/api/v1/batches", data={"model": "tiny"}, headers=auth, content_type="multipart/form-data")
    assert response.status_code == 400
    assert response.get_json()["error"]["code"] == "missing_file"


def test_results_are_in_input_order_with_formula_cells_escaped(client, auth, broker, spec):
    rows = [("=cmd|' /C calc'!A0", "first"), ("b", ""), ("@c", "third"), ("-1", "fourth")]
    batch = upload(client, auth, csv_text(rows, header=("key", "prompt")), id_column="key").get_json()
    response = client.get(f"/api/v1/batches/{batch['id']}/results", headers=auth)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/csv")
    table = list(csv.reader(io.StringIO(response.get_data(as_text=True))))
    assert table[0] == ["key", "status", "text", "finish_reason", "prompt_tokens", "completion_tokens", "error"]
    assert [row[0] for row in table[1:]] == ["'=cmd|' /C calc'!A0", "b", "'@c", "'-1"]
    assert [row[1] for row in table[1:]] == ["queued", "failed", "queued", "queued"]
    assert table[2][6] == "empty_prompt: the prompt is empty"


def test_results_need_a_known_format(client, auth, broker):
    batch = upload(client, auth, "prompt\nx\n").get_json()
    response = client.get(f"/api/v1/batches/{batch['id']}/results?format=parquet", headers=auth)
    assert response.status_code == 400
    assert "format" in response.get_json()["error"]["message"]


def test_cancel_ends_every_queued_row_at_once(client, auth, broker, spec):
    batch = upload(client, auth, "prompt\na\nb\n\nc\n").get_json()
    response = client.post(f"/api/v1/batches/{batch['id']}/cancel", headers=auth)
    assert response.status_code == 200
    cancelled = assert_matches_openapi(spec, "/api/v1/batches/{batch_id}/cancel", "post", response)
    assert cancelled["status"] == "cancelled"
    assert cancelled["request_counts"] == {"total": 3, "completed": 0, "failed": 0, "cancelled": 3}
    assert cancelled["cancelled_at"] is not None and cancelled["completed_at"] is not None
    again = client.post(f"/api/v1/batches/{batch['id']}/cancel", headers=auth)
    assert again.status_code == 409
    assert again.get_json()["error"]["code"] == "batch_finished"


def test_a_batch_whose_every_row_failed_has_failed(client, auth, broker):
    batch = upload(client, auth, "prompt\n \n\t\n").get_json()
    assert batch["status"] == "failed"
    assert batch["request_counts"] == {"total": 2, "completed": 0, "failed": 2, "cancelled": 0}
    assert broker.llen(BULK) == 0


def test_batches_are_listed_newest_first_and_private_to_their_key(app, client, auth, broker, spec):
    first = upload(client, auth, "prompt\na\n").get_json()
    second = upload(client, auth, "prompt\nb\n").get_json()
    page = assert_matches_openapi(spec, "/api/v1/batches", "get", client.get("/api/v1/batches?limit=1", headers=auth))
    assert [b["id"] for b in page["data"]] == [second["id"]]
    rest = client.get(f"/api/v1/batches?cursor={page['next_cursor']}", headers=auth).get_json()
    assert [b["id"] for b in rest["data"]] == [first["id"]] and rest["next_cursor"] is None
    key, _ = make_key(app.extensions["qe_sessions"], "mallory")
    other = {"Authorization": f"Bearer {key.key}"}
    assert client.get(f"/api/v1/batches/{first['id']}", headers=other).status_code == 404
    assert client.get(f"/api/v1/batches/{first['id']}/results", headers=other).status_code == 404
    assert client.post(f"/api/v1/batches/{first['id']}/cancel", headers=other).status_code == 404
    assert client.get("/api/v1/batches", headers=other).get_json()["data"] == []


def test_batch_rows_are_jobs_but_stay_out_of_the_job_list(app, client, auth, broker):
    batch = upload(client, auth, "id,prompt\nrow-a,hello\n").get_json()
    assert client.get("/api/v1/jobs", headers=auth).get_json()["data"] == []
    with app.extensions["qe_sessions"]() as session:
        job_id = session.scalar(select(Job.id).where(Job.batch_id == batch["id"]))
    job = client.get(f"/api/v1/jobs/{job_id}", headers=auth).get_json()
    assert (job["kind"], job["batch_id"], job["custom_id"], job["priority"]) == (
        "batch_item", batch["id"], "row-a", "bulk")
