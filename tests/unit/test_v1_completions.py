"""``POST /v1/chat/completions`` and ``/v1/completions`` with the official
``openai`` client against a real server thread, the test playing the worker:
it claims the job through the run protocol, publishes its stream events and
stores its outcome (real workers are in tests/integration/test_v1_completions.py)."""

import http.client
import threading

import openai
import pytest
import requests
from sqlalchemy import func, select

from queue_engine import streams
from queue_engine.models import Job
from queue_engine.settings import load_settings
from tests.conftest import make_key
from tests.helpers import WebInProcess, assert_matches_openapi, wait_until
from tests.work import break_down, claim_job, reject, succeed

CHAT = [{"role": "user", "content": "Hello"}]


@pytest.fixture
def server(tmp_path, database_url, broker, fake_broker):
    settings = load_settings(environ={}, data_dir=tmp_path, database_url=database_url, broker_url=fake_broker,
                             openai={"queue_timeout_seconds": 3, "retry_after_seconds": 9})
    web = WebInProcess(settings)
    web.settings = web.app.extensions["qe_settings"]
    key, _ = make_key(web.sessions, "alice")
    web.client = openai.OpenAI(api_key=key.key, base_url=web.url + "/v1", max_retries=0)
    yield web
    web.close()


def jobs_stored(server):
    with server.sessions() as session:
        return session.scalar(select(func.count()).select_from(Job))


class Worker(threading.Thread):
    """Plays a worker for the next job stored: ``act(session, settings, job_id, carrier)``."""

    def __init__(self, server, act):
        super().__init__(daemon=True)
        self.server, self.act, self.job_id = server, act, None

    def run(self):
        def stored():
            with self.server.sessions() as session:
                self.job_id = session.scalar(select(Job.id).where(Job.status == "queued"))
            return self.job_id
        wait_until(stored, 10, "a job to be stored")
        with self.server.sessions() as session:
            self.act(session, self.server.settings, self.job_id, streams.open_streams(self.server.settings))
            session.commit()


def run_with(server, act):
    worker = Worker(server, act)
    worker.start()
    return worker


def answer_hello(session, settings, job_id, carrier):
    item = claim_job(session, job_id)
    session.commit()
    carrier.publish([(job_id, {"type": "start", "attempt": item.attempts}),
                     (job_id, {"type": "delta", "attempt": item.attempts,
                               "choices": [{"index": 0, "text": "Hel", "logprobs": None}]}),
                     (job_id, {"type": "delta", "attempt": item.attempts,
                               "choices": [{"index": 0, "text": "lo!", "logprobs": None}]})])
    succeed(session, settings, job_id, text="Hello!", prompt_tokens=3, completion_tokens=2)
    session.commit()
    carrier.publish([(job_id, {"type": "end", "attempt": item.attempts, "finish_reasons": ["stop"],
                               "prompt_tokens": 3, "completion_tokens": 2})])


def test_a_synchronous_chat_request_answers_with_the_stored_job(server):
    run_with(server, answer_hello)
    answer = server.client.chat.completions.create(model="tiny", messages=CHAT)
    assert answer.object == "chat.completion" and answer.choices[0].message.content == "Hello!"
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens, answer.usage.total_tokens) == (3, 2, 5)


def test_a_stream_sends_each_delta_then_the_end_and_usage(server):
    run_with(server, answer_hello)
    chunks = list(server.client.chat.completions.create(model="tiny", messages=CHAT, stream=True,
                                                        stream_options={"include_usage": True}))
    texts = [chunk.choices[0].delta.content for chunk in chunks if chunk.choices]
    assert texts == ["Hel", "lo!", None]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices] == [None, None, "stop"]
    assert chunks[-1].usage.total_tokens == 5 and chunks[-1].choices == []


def test_a_stream_whose_events_were_lost_is_finished_from_the_database(server):
    def answer_without_events(session, settings, job_id, carrier):
        item = claim_job(session, job_id)
        carrier.publish([(job_id, {"type": "start", "attempt": item.attempts})])
        succeed(session, settings, job_id, text="From the row")

    run_with(server, answer_without_events)
    chunks = list(server.client.completions.create(model="tiny", prompt="x", stream=True))
    assert [chunk.choices[0].text for chunk in chunks] == ["From the row", ""]
    assert chunks[-1].choices[0].finish_reason == "stop" and chunks[0].object == "text_completion"


def test_a_retry_after_text_was_streamed_ends_the_stream_with_an_error(server):
    def lose_the_worker(session, settings, job_id, carrier):
        item = claim_job(session, job_id)
        session.commit()
        carrier.publish([(job_id, {"type": "start", "attempt": item.attempts}),
                         (job_id, {"type": "delta", "attempt": item.attempts,
                                   "choices": [{"index": 0, "text": "Half", "logprobs": None}]}),
                         (job_id, {"type": "start", "attempt": item.attempts + 1})])

    run_with(server, lose_the_worker)
    stream = server.client.chat.completions.create(model="tiny", messages=CHAT, stream=True)
    with pytest.raises(openai.APIError, match="started again"):
        for _ in stream:
            pass


def test_a_request_the_engine_refuses_is_a_400_before_any_chunk(server):
    run_with(server, lambda session, settings, job_id, carrier: (
        claim_job(session, job_id), reject(session, settings, job_id, "the prompt is too long")))
    with pytest.raises(openai.BadRequestError, match="too long"):
        server.client.chat.completions.create(model="tiny", messages=CHAT, stream=True)


def test_a_request_that_failed_for_good_is_a_server_error(server):
    def fail(session, settings, job_id, carrier):
        for _ in range(settings.max_attempts):
            session.execute(Job.__table__.update().where(Job.id == job_id).values(retry_at=None))
            claim_job(session, job_id)
            break_down(session, settings, job_id, "the GPU fell off")

    run_with(server, fail)
    with pytest.raises(openai.InternalServerError, match="GPU fell off"):
        server.client.completions.create(model="tiny", prompt="x")


def test_no_worker_in_time_cancels_the_job_and_answers_503_with_retry_after(server):
    with pytest.raises(openai.InternalServerError) as raised:
        server.client.chat.completions.create(model="tiny", messages=CHAT)
    assert raised.value.status_code == 503 and raised.value.response.headers["Retry-After"] == "9"
    assert "openai.queue_timeout_seconds" in raised.value.message
    with server.sessions() as session:
        assert session.scalars(select(Job.status)).all() == ["cancelled"]


@pytest.mark.parametrize("body, param", [
    ({"messages": CHAT, "tools": []}, "tools"),
    ({"messages": CHAT, "logit_bias": {"1": 2}}, "logit_bias"),
    ({"messages": CHAT, "extra_body": {"banana": 1}}, "banana"),
    ({"messages": CHAT, "stream": "yes"}, "stream"),
    ({"messages": CHAT, "temperature": 3}, "temperature"),
    ({"messages": CHAT, "stop": 5}, "stop"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
    ({"messages": []}, "messages"),
    ({"messages": CHAT, "max_tokens": 1, "max_completion_tokens": 2}, None),
])
def test_a_bad_chat_request_is_a_400_naming_the_field_and_stores_nothing(server, body, param):
    with pytest.raises(openai.BadRequestError) as raised:
        server.client.chat.completions.create(model="tiny", **body)
    assert raised.value.param == param
    assert jobs_stored(server) == 0


def test_a_completion_takes_one_prompt(server):
    with pytest.raises(openai.BadRequestError) as raised:
        server.client.completions.create(model="tiny", prompt=["one", "two"])
    assert raised.value.param == "prompt" and "/v1/batches" in raised.value.message
    assert jobs_stored(server) == 0


def test_errors_take_openais_shape_as_the_openapi_document_says(client, auth, spec):
    response = client.post("/v1/chat/completions", headers=auth, json={"model": "tiny", "messages": CHAT,
                                                                        "functions": []})
    assert response.status_code == 400
    error = assert_matches_openapi(spec, "/v1/chat/completions", "post", response)["error"]
    assert (error["param"], error["type"]) == ("functions", "invalid_request_error")


def test_idle_keep_alive_connections_do_not_lock_out_new_clients(server):
    """Clients that keep their connections open between requests (as the openai
    client does) do not use up the server: the next client is answered at once,
    not when an idle connection times out (waitress's default limit is 100)."""
    idle = [http.client.HTTPConnection("127.0.0.1", int(server.url.rsplit(":", 1)[1]), timeout=10)
            for _ in range(150)]
    try:
        for connection in idle:
            connection.request("GET", "/healthz")
            assert connection.getresponse().read() is not None
        newcomer = requests.get(server.url + "/healthz", timeout=10)
        assert newcomer.ok
    finally:
        for connection in idle:
            connection.close()
