"""``/v1/batches`` (OpenAI's Batch API) over the Flask test client: rows are
finished through the real run protocol (``tests/work.py``)."""

import io
import json
from datetime import timedelta

import pytest
from sqlalchemy import select

from queue_engine import openai_batches
from queue_engine.models import Batch, Job
from tests.helpers import assert_matches_openapi
from tests.work import claim_chunk, reject, succeed

CHAT = "/v1/chat/completions"


def line(custom_id, url=CHAT, model="tiny", **body):
    body = {"model": model, "messages": [{"role": "user", "content": f"hi {custom_id}"}], **body}
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


def upload(client, auth, lines):
    data = ("\n".join(lines) + "\n").encode() if isinstance(lines, list) else lines
    form = {"file": (io.BytesIO(data), "input.jsonl"), "purpose": "batch"}
    response = client.post("/v1/files", data=form, headers=auth, content_type="multipart/form-data")
    assert response.status_code == 200, response.get_json()
    return response.get_json()["id"]


def create(client, auth, file_id, endpoint=CHAT, window="24h", **extra):
    return client.post("/v1/batches", json={"input_file_id": file_id, "endpoint": endpoint,
                                            "completion_window": window, **extra}, headers=auth)


def rows(app, batch_id):
    with app.extensions["qe_sessions"]() as session:
        return session.execute(select(Job.id, Job.custom_id, Job.chunk).where(Job.batch_id == batch_id)
                               .order_by(Job.row_index)).all()


def file_lines(client, auth, file_id):
    response = client.get(f"/v1/files/{file_id}/content", headers=auth)
    assert response.status_code == 200
    return [json.loads(text) for text in response.data.decode().splitlines()]


def test_v1_batch_runs_to_the_end_with_output_and_error_files(app, client, auth, spec):
    """Two rows succeed, one fails: output file has two lines, error file one, usage sums the tokens."""
    file_id = upload(client, auth, [line("a"), line("b"), line("c")])
    response = create(client, auth, file_id, metadata={"project": "x"})
    batch = assert_matches_openapi(spec, "/v1/batches", "post", response)
    assert (batch["object"], batch["status"], batch["endpoint"], batch["input_file_id"]) == (
        "batch", "in_progress", CHAT, file_id)
    assert batch["request_counts"] == {"total": 3, "completed": 0, "failed": 0}
    assert batch["expires_at"] - batch["created_at"] == 24 * 3600
    assert (batch["metadata"], batch["output_file_id"], batch["error_file_id"]) == ({"project": "x"}, None, None)
    ids = {row.custom_id: row.id for row in rows(app, batch["id"])}
    settings = app.extensions["qe_settings"]
    with app.extensions["qe_sessions"]() as session:
        claim_chunk(session, batch["id"], 0)
        succeed(session, settings, ids["a"], text="A", prompt_tokens=3, completion_tokens=2)
        succeed(session, settings, ids["b"], text="B", prompt_tokens=4, completion_tokens=1)
        reject(session, settings, ids["c"], "prompt too long")
        session.commit()
    done = assert_matches_openapi(spec, "/v1/batches/{batch_id}", "get",
                                  client.get(f"/v1/batches/{batch['id']}", headers=auth))
    assert (done["status"], done["request_counts"]) == ("completed", {"total": 3, "completed": 2, "failed": 1})
    assert done["completed_at"] is not None and done["failed_at"] is None
    assert done["usage"]["input_tokens"] == 7 and done["usage"]["output_tokens"] == 3
    assert done["usage"]["total_tokens"] == 10
    output = file_lines(client, auth, done["output_file_id"])
    assert [item["custom_id"] for item in output] == ["a", "b"]
    for item, text in zip(output, "AB"):
        assert item["id"].startswith("batch_req_") and item["error"] is None
        assert item["response"]["status_code"] == 200
        body = item["response"]["body"]
        assert (body["object"], body["choices"][0]["message"]["content"]) == ("chat.completion", text)
        assert set(body["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens"}
    errors = file_lines(client, auth, done["error_file_id"])
    assert [(e["custom_id"], e["response"]["status_code"]) for e in errors] == [("c", 400)]
    assert "prompt too long" in errors[0]["error"]["message"]
    meta = client.get(f"/v1/files/{done['output_file_id']}", headers=auth).get_json()
    assert meta["purpose"] == "batch_output"
    assert meta["bytes"] == len(client.get(f"/v1/files/{done['output_file_id']}/content", headers=auth).data)
    # The same batch through the native API.
    native = client.get(f"/api/v1/batches/{batch['id']}", headers=auth).get_json()
    assert (native["status"], native["request_counts"]["completed"]) == ("completed", 2)


@pytest.mark.parametrize("lines, number, param", [
    (b"not json\n", 1, None),
    ([line("a"), "[1, 2]"], 2, None),
    ([line("a"), line("b", url="/v1/completions")], 2, "url"),
    ([line("a"), line("b", model="gpt-4o")], 2, "body.model"),
])
def test_v1_batch_fails_at_validation_naming_the_line(app, client, auth, lines, number, param):
    """A file problem is a 200 with a failed batch whose errors name the line; no row is stored."""
    response = create(client, auth, upload(client, auth, lines))
    assert response.status_code == 200
    batch = response.get_json()
    assert (batch["status"], batch["failed_at"] is not None, batch["in_progress_at"]) == ("failed", True, None)
    [error] = batch["errors"]["data"]
    assert (error["line"], error["param"]) == (number, param)
    assert f"line {number}" in error["message"]
    assert rows(app, batch["id"]) == []


@pytest.mark.parametrize("field, value", [("endpoint", "/v1/embeddings"), ("completion_window", "1h"),
                                          ("metadata", {f"k{i}": "v" for i in range(17)}),
                                          ("metadata", {"k": "v" * 513})])
def test_v1_batch_refuses_bad_fields(client, auth, field, value):
    file_id = upload(client, auth, [line("a")])
    body = {"input_file_id": file_id, "endpoint": CHAT, "completion_window": "24h", field: value}
    response = client.post("/v1/batches", json=body, headers=auth)
    assert response.status_code == 400
    assert response.get_json()["error"]["param"] == field


def test_v1_batches_list_pages(client, auth, spec):
    file_id = upload(client, auth, [line("a")])
    ids = [create(client, auth, file_id).get_json()["id"] for _ in range(3)]
    page = assert_matches_openapi(spec, "/v1/batches", "get", client.get("/v1/batches?limit=2", headers=auth))
    assert ([b["id"] for b in page["data"]], page["has_more"]) == (ids[::-1][:2], True)
    assert (page["object"], page["first_id"], page["last_id"]) == ("list", ids[2], ids[1])
    rest = client.get(f"/v1/batches?after={page['last_id']}", headers=auth).get_json()
    assert ([b["id"] for b in rest["data"]], rest["has_more"]) == ([ids[0]], False)


def test_v1_batch_cancel_keeps_partial_results(app, client, auth, spec):
    """A row that ran is in the output file; the queued one in the error file as batch_cancelled."""
    batch = create(client, auth, upload(client, auth, [line("a"), line("b")])).get_json()
    ids = {row.custom_id: row.id for row in rows(app, batch["id"])}
    settings = app.extensions["qe_settings"]
    with app.extensions["qe_sessions"]() as session:
        session.execute(Job.__table__.update().where(Job.id == ids["b"]).values(chunk=99))
        claim_chunk(session, batch["id"], 0)
        session.commit()
    cancelling = assert_matches_openapi(spec, "/v1/batches/{batch_id}/cancel", "post",
                                        client.post(f"/v1/batches/{batch['id']}/cancel", headers=auth))
    assert cancelling["status"] == "cancelling" and cancelling["cancelling_at"] is not None
    with app.extensions["qe_sessions"]() as session:
        succeed(session, settings, ids["a"], text="A")
        session.commit()
    done = client.get(f"/v1/batches/{batch['id']}", headers=auth).get_json()
    assert (done["status"], done["request_counts"]) == ("cancelled", {"total": 2, "completed": 1, "failed": 1})
    assert [item["custom_id"] for item in file_lines(client, auth, done["output_file_id"])] == ["a"]
    [error] = file_lines(client, auth, done["error_file_id"])
    assert (error["custom_id"], error["response"], error["error"]["code"]) == ("b", None, "batch_cancelled")


def test_v1_batch_expires(make_app, auth_for):
    """Past expires_at the sweep cancels unfinished rows (queued and running) as batch_expired;
    the finished row stays in the output file; a worker finishing an expired row changes nothing."""
    app = make_app(batches={"completion_windows": ["2s"]})
    client, auth = app.test_client(), auth_for(app)
    batch = create(client, auth, upload(client, auth, [line("a"), line("b"), line("c")]), window="2s").get_json()
    assert batch["expires_at"] - batch["created_at"] == 2
    ids = {row.custom_id: row.id for row in rows(app, batch["id"])}
    settings, sessions = app.extensions["qe_settings"], app.extensions["qe_sessions"]
    with sessions() as session:
        session.execute(Job.__table__.update().where(Job.id == ids["c"]).values(chunk=99))
        claim_chunk(session, batch["id"], 0)
        succeed(session, settings, ids["a"])
        session.commit()
    with sessions() as session:
        assert openai_batches.expire_batches(session) == []  # not yet due
        expires_at = session.get(Batch, batch["id"]).expires_at
        assert openai_batches.expire_batches(session, expires_at + timedelta(seconds=1)) == [batch["id"]]
        session.commit()
    with sessions() as session:
        assert openai_batches.expire_batches(session, expires_at + timedelta(seconds=2)) == []
        succeed(session, settings, ids["b"])  # the row was running when the batch expired
        session.commit()
    done = client.get(f"/v1/batches/{batch['id']}", headers=auth).get_json()
    assert (done["status"], done["expired_at"] is not None) == ("expired", True)
    assert done["request_counts"] == {"total": 3, "completed": 1, "failed": 2}
    assert [item["custom_id"] for item in file_lines(client, auth, done["output_file_id"])] == ["a"]
    errors = file_lines(client, auth, done["error_file_id"])
    assert [(e["custom_id"], e["error"]["code"]) for e in errors] == [("b", "batch_expired"), ("c", "batch_expired")]
    native = client.get(f"/api/v1/batches/{batch['id']}", headers=auth).get_json()
    assert native["status"] == "expired"


def test_v1_batches_are_isolated_between_keys(app, client, auth, auth_for):
    file_id = upload(client, auth, [line("a")])
    batch = create(client, auth, file_id).get_json()
    other = auth_for(app, "bob")
    for response in (create(client, other, file_id), client.get(f"/v1/batches/{batch['id']}", headers=other),
                     client.post(f"/v1/batches/{batch['id']}/cancel", headers=other),
                     client.get(f"/v1/files/{file_id}/content", headers=other)):
        assert response.status_code == 404
        assert response.get_json()["error"]["code"] == "not_found"
    assert client.get("/v1/batches", headers=other).get_json()["data"] == []


def test_deleting_the_input_file_keeps_the_batch(app, client, auth):
    file_id = upload(client, auth, [line("a")])
    batch = create(client, auth, file_id).get_json()
    assert client.delete(f"/v1/files/{file_id}", headers=auth).status_code == 200
    got = client.get(f"/v1/batches/{batch['id']}", headers=auth).get_json()
    assert (got["status"], got["input_file_id"], got["request_counts"]["total"]) == ("in_progress", file_id, 1)
