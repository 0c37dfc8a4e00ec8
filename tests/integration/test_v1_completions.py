"""OpenAI's chat and text completions, synchronous and streamed, with the
official ``openai`` client unchanged, through the queue: against a real
``serve`` in embedded mode and a cluster with a real worker."""

import json

import jsonschema
import openai
import pytest
import requests

from tests.conftest import make_key
from tests.helpers import metric_value, stop_process, wait_until
from tests.integration.conftest import Cluster
from tests.integration.test_embedded import start_embedded

pytestmark = pytest.mark.integration

#: "idle" is a profile no worker serves: its requests wait, then give up.
CONFIG = '[openai]\nqueue_timeout_seconds = 2\nretry_after_seconds = 7\n[models.idle]\npath = "{tiny}"\n'
CHAT = [{"role": "user", "content": "Tell me about the list of numbers"}]


@pytest.fixture(scope="module", params=["embedded", "cluster"])
def server(request, tmp_path_factory, tiny_model_dir):
    """``{url, key, metrics, mode}``: a module-scoped server in each mode; ``metrics``
    is where the worker's engine counters are read."""
    directory = tmp_path_factory.mktemp(request.param)
    config = CONFIG.replace("{tiny}", str(tiny_model_dir))
    if request.param == "cluster":
        cluster = Cluster(directory, tiny_model_dir, request.getfixturevalue("redis_server").url,
                          request.getfixturevalue("cluster_database_url"), config_toml=config)
        worker = cluster.start_worker()
        key = make_key(cluster.sessions, "v1-chat")[0].key
        yield {"url": cluster.url, "key": key, "metrics": f"http://127.0.0.1:{worker.metrics_port}/metrics",
               "mode": "cluster"}
        cluster.stop()
        return
    process, embedded = start_embedded(directory, tiny_model_dir, config)
    yield {"url": embedded["url"], "key": embedded["key"], "metrics": embedded["url"] + "/metrics",
           "mode": "embedded"}
    stop_process(process)


def client_for(server):
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key=server["key"], max_retries=0)


def native_job(server, job_id):
    answer = requests.get(f"{server['url']}/api/v1/jobs/{job_id}",
                          headers={"Authorization": f"Bearer {server['key']}"}, timeout=10)
    assert answer.status_code == 200, answer.text
    return answer.json()


def engine_count(server, outcome):
    return metric_value(requests.get(server["metrics"], timeout=10).text, "qe_engine_requests_total", outcome=outcome)


def test_a_chat_completion_is_a_job_on_the_interactive_lane(server):
    client = client_for(server)
    answer = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=8, temperature=0)
    assert answer.object == "chat.completion" and answer.model == "tiny"
    assert answer.choices[0].message.role == "assistant" and answer.choices[0].message.content
    assert answer.choices[0].finish_reason in ("stop", "length")
    assert 0 < answer.usage.completion_tokens <= 8
    job = native_job(server, answer.id.removeprefix("chatcmpl-"))
    assert (job["status"], job["priority"], job["kind"]) == ("succeeded", "interactive", "single")
    assert job["result"]["text"] == answer.choices[0].message.content


def test_a_text_completion_answers_in_openais_shape(server):
    answer = client_for(server).completions.create(model="tiny", prompt="The list", max_tokens=6, temperature=1,
                                                   n=2, seed=3)
    assert answer.object == "text_completion" and len(answer.choices) == 2
    assert [choice.index for choice in answer.choices] == [0, 1]
    assert answer.usage.prompt_tokens > 0 and answer.usage.total_tokens == (
        answer.usage.prompt_tokens + answer.usage.completion_tokens)


@pytest.mark.parametrize("kind", ["chat", "completions"])
def test_streamed_chunks_join_to_the_answer_a_request_without_stream_gets(server, kind):
    client = client_for(server)
    if kind == "chat":
        create, args = client.chat.completions.create, {"messages": CHAT}
    else:
        create, args = client.completions.create, {"prompt": "The list of numbers"}
    args.update(model="tiny", max_tokens=24, temperature=0)
    whole = create(**args)
    chunks = list(create(stream=True, stream_options={"include_usage": True}, **args))
    assert len(chunks) > 3, "the answer came in one piece, not as it was generated"
    if kind == "chat":
        expected = whole.choices[0].message.content
        joined = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
        assert chunks[0].object == "chat.completion.chunk" and chunks[0].choices[0].delta.role == "assistant"
    else:
        expected = whole.choices[0].text
        joined = "".join(chunk.choices[0].text for chunk in chunks if chunk.choices)
    assert joined == expected
    finishes = [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices and chunk.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    job = native_job(server, chunks[0].id.split("-", 1)[1])
    assert job["status"] == "succeeded" and job["result"]["text"] == expected


def test_a_client_that_goes_away_cancels_its_job_and_the_engine_stops_it(server):
    client = client_for(server)
    aborted = engine_count(server, "aborted")
    stream = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=500, temperature=1,
                                            stream=True)
    first = next(iter(stream))
    job_id = first.id.removeprefix("chatcmpl-")
    assert native_job(server, job_id)["status"] == "running"
    stream.close()
    wait_until(lambda: native_job(server, job_id)["status"] == "cancelled", 30, "the job to be cancelled")
    wait_until(lambda: engine_count(server, "aborted") > aborted, 30, "the engine to abort the request")


def test_a_request_no_worker_starts_in_time_is_cancelled_and_answered_503(server):
    client = client_for(server)
    with pytest.raises(openai.InternalServerError) as raised:
        client.chat.completions.create(model="idle", messages=CHAT, max_tokens=4)
    assert raised.value.status_code == 503 and raised.value.response.headers["Retry-After"] == "7"
    assert raised.value.code == "no_worker_available"
    with pytest.raises(openai.InternalServerError) as raised:
        client.completions.create(model="idle", prompt="x", max_tokens=4, stream=True)
    assert raised.value.status_code == 503
    jobs = requests.get(f"{server['url']}/api/v1/jobs?limit=5", timeout=10,
                        headers={"Authorization": f"Bearer {server['key']}"}).json()["data"]
    idle = [job for job in jobs if job["model"] == "idle"]
    assert len(idle) == 2 and {job["status"] for job in idle} == {"cancelled"}


def test_json_schema_answers_validate_against_the_schema(server):
    schema = {"type": "object", "properties": {"label": {"enum": ["yes", "no"]}}, "required": ["label"],
              "additionalProperties": False}
    answer = client_for(server).chat.completions.create(
        model="tiny", messages=CHAT, max_tokens=40, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "verdict", "schema": schema}})
    jsonschema.validate(json.loads(answer.choices[0].message.content), schema)


def test_a_parameter_the_server_does_not_support_is_a_400_naming_it(server):
    with pytest.raises(openai.BadRequestError) as raised:
        client_for(server).chat.completions.create(model="tiny", messages=CHAT, tools=[
            {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}])
    assert raised.value.param == "tools" and raised.value.code == "unsupported_parameter"
