"""``/v1/files`` (OpenAI's Files API) over the Flask test client, and with the
official ``openai`` client, unchanged, against a real server thread."""

import io

import openai
import pytest
from sqlalchemy import func, select

from queue_engine.models import File
from queue_engine.settings import load_settings
from tests.conftest import make_key
from tests.helpers import WebInProcess, assert_matches_openapi

JSONL = b'{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {}}\n'


def upload(client, auth, data=JSONL, purpose="batch", filename="input.jsonl"):
    form = {"file": (io.BytesIO(data), filename)}
    if purpose is not None:
        form["purpose"] = purpose
    return client.post("/v1/files", data=form, headers=auth, content_type="multipart/form-data")


def stored_files(app, tmp_path):
    """(rows in the database, names in the files directory, temporary ones included)."""
    with app.extensions["qe_sessions"]() as session:
        rows = session.scalar(select(func.count(File.id)))
    directory = tmp_path / "files"
    return rows, sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def test_v1_files_round_trip(client, auth, spec, tmp_path):
    """Upload, read, download the same bytes, delete; then it is a 404 and gone from disk."""
    response = upload(client, auth)
    assert response.status_code == 200, response.get_json()
    file = assert_matches_openapi(spec, "/v1/files", "post", response)
    assert file["id"].startswith("file-")
    assert (file["object"], file["bytes"], file["filename"], file["purpose"]) == ("file", len(JSONL), "input.jsonl", "batch")
    assert isinstance(file["created_at"], int)
    assert (tmp_path / "files" / file["id"]).read_bytes() == JSONL
    got = client.get(f"/v1/files/{file['id']}", headers=auth)
    assert assert_matches_openapi(spec, "/v1/files/{file_id}", "get", got) == file
    content = client.get(f"/v1/files/{file['id']}/content", headers=auth)
    assert (content.status_code, content.data) == (200, JSONL)
    deleted = client.delete(f"/v1/files/{file['id']}", headers=auth)
    assert assert_matches_openapi(spec, "/v1/files/{file_id}", "delete", deleted) == {
        "id": file["id"], "object": "file", "deleted": True}
    gone = client.get(f"/v1/files/{file['id']}", headers=auth)
    assert gone.status_code == 404
    assert assert_matches_openapi(spec, "/v1/files/{file_id}", "get", gone)["error"]["code"] == "not_found"
    assert not (tmp_path / "files" / file["id"]).exists()


def test_v1_files_list_pages_newest_first(client, auth, spec):
    """limit/after page newest first; order=asc reverses; purpose filters."""
    ids = [upload(client, auth, filename=f"f{i}.jsonl").get_json()["id"] for i in range(5)]
    first = client.get("/v1/files?limit=2", headers=auth)
    page = assert_matches_openapi(spec, "/v1/files", "get", first)
    assert [f["id"] for f in page["data"]] == ids[::-1][:2]
    assert (page["object"], page["has_more"], page["first_id"], page["last_id"]) == ("list", True, ids[4], ids[3])
    rest = client.get(f"/v1/files?limit=10&after={page['last_id']}", headers=auth).get_json()
    assert ([f["id"] for f in rest["data"]], rest["has_more"]) == (ids[2::-1], False)
    ascending = client.get(f"/v1/files?order=asc&after={ids[1]}", headers=auth).get_json()
    assert [f["id"] for f in ascending["data"]] == ids[2:]
    assert client.get("/v1/files?purpose=fine-tune", headers=auth).get_json()["data"] == []


@pytest.mark.parametrize("query, param", [("limit=0", "limit"), ("limit=x", "limit"), ("order=up", "order")])
def test_v1_files_list_refuses_bad_paging(client, auth, spec, query, param):
    """A bad paging parameter is a 400 in OpenAI's shape, naming it."""
    response = client.get(f"/v1/files?{query}", headers=auth)
    assert response.status_code == 400
    assert assert_matches_openapi(spec, "/v1/files", "get", response)["error"]["param"] == param


@pytest.mark.parametrize("purpose", ["fine-tune", "", None])
def test_v1_files_refuses_another_purpose(app, client, auth, spec, tmp_path, purpose):
    """Only purpose=batch is accepted: a 400 naming purpose, nothing stored."""
    response = upload(client, auth, purpose=purpose)
    assert response.status_code == 400
    error = assert_matches_openapi(spec, "/v1/files", "post", response)["error"]
    assert (error["param"], error["type"]) == ("purpose", "invalid_request_error")
    assert "batch" in error["message"]
    assert stored_files(app, tmp_path) == (0, [])


@pytest.mark.parametrize("size", [3000, 200_000])
def test_v1_files_over_the_limit_is_413_and_stores_nothing(make_app, auth_for, spec, tmp_path, size):
    """Over files.max_bytes: a 413 in OpenAI's shape (whether the body or the copy finds it), nothing kept."""
    app = make_app(files={"max_bytes": 2048})
    client = app.test_client()
    response = upload(client, auth_for(app), data=b"x" * size)
    assert response.status_code == 413
    error = assert_matches_openapi(spec, "/v1/files", "post", response)["error"]
    assert "files.max_bytes" in error["message"]
    assert stored_files(app, tmp_path) == (0, [])
    assert upload(client, auth_for(app, "bob"), data=b"x" * 2048).status_code == 200


def test_v1_files_of_another_key_are_404(app, client, auth, auth_for):
    """Another key's file is not found, not listed, not deleted."""
    file_id = upload(client, auth).get_json()["id"]
    bob = auth_for(app, "bob")
    for method, path in [("get", ""), ("get", "/content"), ("delete", "")]:
        response = getattr(client, method)(f"/v1/files/{file_id}{path}", headers=bob)
        assert response.status_code == 404, (method, path)
        assert response.get_json()["error"]["type"] == "invalid_request_error"
    assert client.get("/v1/files", headers=bob).get_json()["data"] == []
    assert client.get(f"/v1/files/{file_id}", headers=auth).status_code == 200


def test_v1_files_need_a_key(client, spec):
    """No key: a 401 in OpenAI's shape; the native API keeps its own shape."""
    response = client.get("/v1/files")
    assert response.status_code == 401
    error = assert_matches_openapi(spec, "/v1/files", "get", response)["error"]
    assert (error["code"], error["param"]) == ("unauthorized", None)
    assert set(client.get("/api/v1/jobs").get_json()["error"]) == {"code", "message"}


@pytest.fixture
def server(tmp_path, database_url, fake_broker):
    settings = load_settings(environ={}, data_dir=tmp_path, database_url=database_url, broker_url=fake_broker,
                             files={"max_bytes": 4096})
    web = WebInProcess(settings)
    yield web
    web.close()


def openai_client(server, name="alice"):
    key, _ = make_key(server.sessions, name)
    return openai.OpenAI(api_key=key.key, base_url=server.url + "/v1", max_retries=0)


def test_v1_files_with_the_openai_client(server):
    """The official client, unchanged: create, retrieve, content, list with auto-paging, delete."""
    client = openai_client(server)
    created = [client.files.create(file=(f"in{i}.jsonl", JSONL), purpose="batch") for i in range(3)]
    file = client.files.retrieve(created[0].id)
    assert (file.id, file.bytes, file.filename, file.purpose, file.object) == (
        created[0].id, len(JSONL), "in0.jsonl", "batch", "file")
    assert client.files.content(file.id).content == JSONL
    first = client.files.list(limit=2)
    assert [f.id for f in first.data] == [created[2].id, created[1].id] and first.has_more
    assert [f.id for f in client.files.list(limit=2)] == [f.id for f in reversed(created)]
    assert client.files.delete(file.id).deleted is True
    with pytest.raises(openai.NotFoundError, match="no file"):
        client.files.retrieve(file.id)


def test_v1_files_errors_raise_the_openai_exception_classes(server):
    """400, 401, 404 and 413 become the client's matching exceptions."""
    client = openai_client(server)
    with pytest.raises(openai.BadRequestError) as raised:
        client.files.create(file=("in.jsonl", JSONL), purpose="fine-tune")
    assert raised.value.param == "purpose"
    with pytest.raises(openai.APIStatusError) as raised:
        client.files.create(file=("big.jsonl", b"x" * 5000), purpose="batch")
    assert raised.value.status_code == 413
    file_id = client.files.create(file=("in.jsonl", JSONL), purpose="batch").id
    with pytest.raises(openai.NotFoundError):
        openai_client(server, "bob").files.retrieve(file_id)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(api_key="wrong", base_url=server.url + "/v1", max_retries=0).files.list()
