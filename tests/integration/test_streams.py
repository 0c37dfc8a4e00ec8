"""Streamed jobs' events between worker and web (``queue_engine.streams``) on
a real redis-server and in-process, and the worker's publisher
(``workers.streaming``) that merges deltas and aborts what its reader left."""

import threading

import pytest

from queue_engine.streams import LocalStreams, RedisStreams
from tests.helpers import wait_until
from workers.streaming import StreamPublisher


@pytest.fixture(params=["redis", "local"])
def carrier(request):
    if request.param == "local":
        return LocalStreams()
    return RedisStreams(request.getfixturevalue("redis_server").url)


def delta(text, attempt=1, index=0):
    return {"type": "delta", "attempt": attempt, "choices": [{"index": index, "text": text, "logprobs": None}]}


def test_a_reader_gets_every_event_in_order_from_the_start(carrier):
    carrier.publish([("j1", {"type": "start", "attempt": 1}), ("j1", delta("a")), ("j2", delta("other"))])
    carrier.publish([("j1", delta("b"))])
    events, position = carrier.read("j1", "0", 1)
    assert [event.get("choices", [{}])[0].get("text") for event in events] == [None, "a", "b"]
    assert carrier.read("j1", position, 0.05) == ([], position)


def test_a_blocked_reader_wakes_when_an_event_comes(carrier):
    threading.Timer(0.2, carrier.publish, [[("blocked", delta("late"))]]).start()
    events, _ = carrier.read("blocked", "0", 10)
    assert events == [delta("late")]


def test_a_cancel_is_seen_for_that_job_only(carrier):
    carrier.cancel("gone")
    assert carrier.cancelled(["gone", "here"]) == {"gone"}
    assert carrier.cancelled([]) == set()


class Item:
    def __init__(self, job_id, attempts=1):
        self.id, self.attempts, self.request_id = job_id, attempts, f"{job_id}:{attempts}"


class Loop:
    """Records what the publisher aborts (the engine loop's abort)."""

    def __init__(self):
        self.aborted = []

    def abort(self, request_id):
        self.aborted.append(request_id)


class Generated:
    text, finish_reason, prompt_tokens, completion_tokens, output = "ab", "stop", 2, 2, None


def test_the_publisher_sends_start_deltas_and_end_in_order(carrier):
    publisher = StreamPublisher(carrier, Loop())
    on_delta = publisher.started(Item("j"))
    on_delta([(0, "a", None)])
    on_delta([(0, "b", None), (1, "c", None)])
    publisher.ended(Item("j"), Generated())
    publisher.start()
    try:
        events, at = [], "0"

        def ended():
            nonlocal at
            new, at = carrier.read("j", at, 0.1)
            events.extend(new)
            return events and events[-1]["type"] == "end"

        wait_until(ended, 10, "the end event")
    finally:
        publisher.stop()
    assert events[0] == {"type": "start", "attempt": 1}
    # Deltas that waited together go out as one event, each choice's text joined.
    assert events[1]["choices"] == [{"index": 0, "text": "ab", "logprobs": None},
                                    {"index": 1, "text": "c", "logprobs": None}]
    assert events[2] == {"type": "end", "attempt": 1, "finish_reasons": ["stop"], "prompt_tokens": 2,
                         "completion_tokens": 2}


def test_the_publisher_aborts_a_running_job_whose_reader_cancelled(carrier):
    loop = Loop()
    publisher = StreamPublisher(carrier, loop).start()
    try:
        publisher.started(Item("left"))
        publisher.started(Item("kept"))
        carrier.cancel("left")
        wait_until(lambda: loop.aborted, 10, "the abort")
    finally:
        publisher.stop()
    assert loop.aborted == ["left:1"]


def test_every_web_thread_can_wait_on_its_stream_at_once(redis_server):
    """One blocked read per waiting request: the pool holds a connection for each
    web thread, past redis-py's default of 100."""
    from queue_engine.settings import load_settings
    from queue_engine.streams import open_streams

    settings = load_settings(environ={"QUEUE_ENGINE_BROKER_URL": redis_server.url, "QUEUE_ENGINE_WEB_THREADS": "150"})
    carrier = open_streams(settings)
    waiting = 150
    barrier, errors = threading.Barrier(waiting), []

    def wait_for_one(index):
        try:
            barrier.wait(30)
            carrier.read(f"many-{index}", "0", 0.5)
        except Exception as e:  # noqa: BLE001 - collected, asserted below
            errors.append(e)

    threads = [threading.Thread(target=wait_for_one, args=(i,)) for i in range(waiting)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
