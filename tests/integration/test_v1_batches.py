"""OpenAI's Batch API with the official ``openai`` client, unchanged, against
a real ``serve`` in embedded mode and a cluster with a real worker."""

import io
import json

import openai
import pytest

from queue_engine.db import make_sessions
from queue_engine.settings import load_settings
from tests.conftest import make_key
from tests.helpers import stop_process, wait_until
from tests.integration.conftest import Cluster
from tests.integration.test_embedded import start_embedded

pytestmark = pytest.mark.integration

#: A short window for the expiry test, and a quick expiry sweep.
CONFIG = '[batches]\ncompletion_windows = ["24h", "2s"]\n[dispatcher]\ncheck_interval = 0.5\n'


@pytest.fixture(scope="module", params=["embedded", "cluster"])
def server(request, tmp_path_factory, tiny_model_dir):
    """``{url, key, other_key, mode}`` of a module-scoped server in each mode."""
    directory = tmp_path_factory.mktemp(request.param)
    # "idle" runs on no worker (embedded mode runs one for tiny only): its batches wait, then expire.
    config = CONFIG + f'[models.idle]\npath = "{tiny_model_dir}"\n'
    if request.param == "cluster":
        redis_server = request.getfixturevalue("redis_server")
        database_url = request.getfixturevalue("cluster_database_url")
        cluster = Cluster(directory, tiny_model_dir, redis_server.url, database_url, config_toml=config)
        cluster.start_worker()
        keys = [make_key(cluster.sessions, name)[0].key for name in ("v1-a", "v1-b")]
        yield {"url": cluster.url, "key": keys[0], "other_key": keys[1], "mode": "cluster"}
        cluster.stop()
        return
    process, embedded = start_embedded(directory, tiny_model_dir, config)
    other_key = make_key(make_sessions(load_settings(environ=embedded["env"]).sqlalchemy_url), "v1-other")[0].key
    yield {"url": embedded["url"], "key": embedded["key"], "other_key": other_key, "mode": "embedded"}
    stop_process(process)


def client_for(server, key=None):
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key=key or server["key"], max_retries=0)


def request_line(custom_id, endpoint, model="tiny", max_tokens=4):
    body = {"model": model, "max_tokens": max_tokens, "temperature": 0}
    if endpoint == "/v1/chat/completions":
        body["messages"] = [{"role": "user", "content": f"Say {custom_id}"}]
    else:
        body["prompt"] = f"Count {custom_id}:"
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": endpoint, "body": body})


def upload(client, lines):
    data = ("\n".join(lines) + "\n").encode()
    return client.files.create(file=("input.jsonl", io.BytesIO(data)), purpose="batch")


def wait_for_end(client, batch_id, timeout=120):
    ended = {}

    def done():
        ended["batch"] = client.batches.retrieve(batch_id)
        return ended["batch"].status in ("completed", "failed", "expired", "cancelled")

    wait_until(done, timeout, f"batch {batch_id} to end", 0.2)
    return ended["batch"]


def lines_of(client, file_id):
    if file_id is None:
        return []
    return [json.loads(text) for text in client.files.content(file_id).text.splitlines()]


@pytest.mark.parametrize("endpoint, obj", [("/v1/chat/completions", "chat.completion"),
                                           ("/v1/completions", "text_completion")])
def test_a_batch_runs_to_the_end(server, endpoint, obj):
    """Every row in the output file, in OpenAI's line format; the one blank row in the error file."""
    client = client_for(server)
    blank = json.dumps({"custom_id": "blank", "method": "POST", "url": endpoint,
                        "body": {"model": "tiny", **({"messages": [{"role": "user", "content": "  "}]}
                                                     if obj == "chat.completion" else {"prompt": "  "})}})
    file = upload(client, [request_line(f"r{i}", endpoint) for i in range(5)] + [blank])
    batch = client.batches.create(input_file_id=file.id, endpoint=endpoint, completion_window="24h",
                                  metadata={"run": "t"})
    assert (batch.status, batch.metadata, batch.endpoint) == ("in_progress", {"run": "t"}, endpoint)
    done = wait_for_end(client, batch.id)
    assert done.status == "completed", done
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (6, 5, 1)
    output = lines_of(client, done.output_file_id)
    assert sorted(item["custom_id"] for item in output) == [f"r{i}" for i in range(5)]
    completion_tokens = 0
    for item in output:
        assert item["id"].startswith("batch_req_") and item["error"] is None
        assert item["response"]["status_code"] == 200
        body = item["response"]["body"]
        assert body["object"] == obj and body["model"] == "tiny"
        assert 0 < body["usage"]["completion_tokens"] <= 4
        completion_tokens += body["usage"]["completion_tokens"]
    assert done.usage.output_tokens == completion_tokens
    [error] = lines_of(client, done.error_file_id)
    assert error["custom_id"] == "blank" and error["error"]["code"]
    assert error["response"]["status_code"] == 400


def test_a_malformed_file_fails_the_batch(server):
    client = client_for(server)
    file = upload(client, [request_line("a", "/v1/completions"), "{not json"])
    batch = client.batches.create(input_file_id=file.id, endpoint="/v1/completions", completion_window="24h")
    assert batch.status == "failed" and batch.failed_at is not None
    assert [(e.line, e.code) for e in batch.errors.data] == [(2, "invalid_file")]


def test_cancel_keeps_partial_results(server):
    """Cancelled once some rows are done: they stay in the output file, the rest are batch_cancelled.

    Rows a worker already holds run to their end, and a worker may hold
    most of a small batch, so how many are cancelled is not fixed here
    (tests/unit/test_v1_batches.py cancels a fixed number)."""
    client = client_for(server)
    file = upload(client, [request_line(f"r{i}", "/v1/completions", max_tokens=16) for i in range(2000)])
    batch = client.batches.create(input_file_id=file.id, endpoint="/v1/completions", completion_window="24h")
    wait_until(lambda: client.batches.retrieve(batch.id).request_counts.completed > 0, 120, "a row to finish", 0.05)
    assert client.batches.cancel(batch.id).status in ("cancelling", "cancelled")
    done = wait_for_end(client, batch.id)
    assert done.status == "cancelled"
    output, errors = lines_of(client, done.output_file_id), lines_of(client, done.error_file_id)
    assert len(output) == done.request_counts.completed > 0
    assert len(errors) == done.request_counts.failed
    assert {e["error"]["code"] for e in errors} <= {"batch_cancelled"}
    assert len(output) + len(errors) == done.request_counts.total == 2000


def test_list_pages_and_isolation(server):
    client, other = client_for(server), client_for(server, server["other_key"])
    file = upload(client, [request_line("a", "/v1/completions")])
    ids = [client.batches.create(input_file_id=file.id, endpoint="/v1/completions", completion_window="24h").id
           for _ in range(3)]
    page = client.batches.list(limit=2)
    assert [b.id for b in page.data] == ids[::-1][:2] and page.has_more
    assert [b.id for b in page.get_next_page().data][:1] == [ids[0]]
    with pytest.raises(openai.NotFoundError):
        other.batches.retrieve(ids[0])
    with pytest.raises(openai.NotFoundError):
        other.batches.create(input_file_id=file.id, endpoint="/v1/completions", completion_window="24h")
    with pytest.raises(openai.NotFoundError):
        other.files.content(file.id)
    assert ids[0] not in [b.id for b in other.batches.list().data]


def test_a_batch_expires(server):
    """With a 2s window and no worker for its model, every row expires into the error file."""
    client = client_for(server)
    file = upload(client, [request_line(f"r{i}", "/v1/completions", model="idle") for i in range(3)])
    batch = client.batches.create(input_file_id=file.id, endpoint="/v1/completions", completion_window="2s")
    assert batch.expires_at - batch.created_at == 2
    done = wait_for_end(client, batch.id, 30)
    assert done.status == "expired" and done.expired_at is not None and done.output_file_id is None
    errors = lines_of(client, done.error_file_id)
    assert [(e["custom_id"], e["error"]["code"]) for e in errors] == [(f"r{i}", "batch_expired") for i in range(3)]
