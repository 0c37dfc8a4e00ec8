"""``POST /v1/chat/completions`` and ``/v1/completions``: OpenAI's synchronous
and streamed requests, each a job on the interactive lane.

A request is stored and sent like any job (claimed, leased, retried, counted,
visible at ``/api/v1/jobs``); this module only waits for it. Without
``stream`` it waits for the job to end and answers with OpenAI's object. With
``stream`` it answers server-sent events in OpenAI's chunk format as the
worker publishes the text (``queue_engine.streams``), ending with
``data: [DONE]``; the database stays the record, and fills in whatever the
published events missed.

A request waits for a worker to start its job up to
``openai.queue_timeout_seconds``, then its job is cancelled and it is
answered 503 with ``Retry-After``. A client that goes away cancels its job,
and the worker aborts it in the engine.
"""

import json
import time

from flask import Blueprint, Response, current_app, request, stream_with_context

from queue_engine import completions, jobs, streams
from queue_engine.completions import CHAT, COMPLETIONS
from queue_engine.errors import InvalidRequestError, JobFailedError, JobFinishedError, NoWorkerError
from queue_engine.jobs import FINISHED, JobState
from queue_engine.models import Job

from . import metrics
from .auth import require_api_key
from .db import close_session, get_session
from .jobs import json_body
from .queueing import submit_job

bp = Blueprint("v1_completions", __name__, url_prefix="/v1")
bp.before_request(require_api_key)

#: Seconds between looks at the database (and at the client) while a request waits.
LOOK_INTERVAL = 1.0
ENDED = {state.value for state in FINISHED}


@bp.post("/chat/completions")
def chat_completions():
    return complete(CHAT)


@bp.post("/completions")
def text_completions():
    return complete(COMPLETIONS)


def complete(endpoint):
    asked = completions.read_request(endpoint, json_body())
    job, _ = submit_job(asked.job, stream=asked.stream)
    job_id = job.id
    close_session()  # a waiting request holds no database connection
    if asked.stream:
        return stream_answer(endpoint, job_id, asked.include_usage)
    job = wait_for_answer(job_id)
    return answer_or_error(endpoint, job)


# --- waiting -------------------------------------------------------------------


class Wait:
    """The time a request's job has spent queued, as seen at each look; past
    ``openai.queue_timeout_seconds`` its job is cancelled (:meth:`check`)."""

    def __init__(self, job_id):
        self.job_id = job_id
        self.settings = current_app.extensions["qe_settings"].openai
        self.queued_for, self._last = 0.0, time.monotonic()

    def look(self):
        """The job as the database has it now (the session is closed again)."""
        job = get_session().get(Job, self.job_id)
        close_session()
        now = time.monotonic()
        if job.status == JobState.QUEUED.value:
            self.queued_for += now - self._last
        self._last = now
        return job

    def left(self):
        return max(0.0, self.settings.queue_timeout_seconds - self.queued_for)

    def check(self, job):
        """Raise :class:`NoWorkerError` (cancelling the job) if it waited queued too long."""
        if job.status != JobState.QUEUED.value or self.left() > 0:
            return
        session = get_session()
        gave_up = jobs.transition(session, self.job_id, JobState.QUEUED, JobState.CANCELLED, lease_owner=None)
        session.commit()
        close_session()
        if gave_up:
            metrics.count_cancelled(job.model, job.lane, "single")
            raise NoWorkerError(
                f"no worker started this request within {self.settings.queue_timeout_seconds:g} s "
                f"(openai.queue_timeout_seconds); it was cancelled. A worker for {job.model!r} may be starting: "
                f"try again in {self.settings.retry_after_seconds} s", self.settings.retry_after_seconds)


def wait_for_answer(job_id):
    """The job once it has ended; a client that went away cancels it.

    The worker's end event (``queue_engine.streams``) wakes the wait; the
    database is looked at then, and once a second without one.
    """
    wait, carrier = Wait(job_id), open_streams()
    gone = request.environ.get("waitress.client_disconnected")
    position = "0"
    while True:
        job = wait.look()
        if job.status in ENDED:
            return job
        wait.check(job)
        if gone is not None and gone():
            give_up(job)
            return job
        _, position = carrier.read(job_id, position, min(LOOK_INTERVAL, wait.left() or LOOK_INTERVAL))


def give_up(job):
    """The client went away: cancel its job, and tell the worker to stop at once."""
    session = get_session()
    try:
        jobs.cancel_job(session, job.owner_id, job.id)
        session.commit()
        metrics.count_cancelled(job.model, job.lane, "single")
    except JobFinishedError:
        pass
    finally:
        close_session()
    open_streams().cancel(job.id)


def answer_or_error(endpoint, job):
    """OpenAI's object for a job that succeeded; else the error it ended with."""
    if job.status == JobState.SUCCEEDED.value:
        return completions.response_body(endpoint, job)
    raise job_error(job)


def job_error(job):
    if job.status == JobState.CANCELLED.value:
        return JobFinishedError(f"job {job.id!r} was cancelled before it answered")
    if job.error_code == "engine_rejected":
        return InvalidRequestError(job.error_message or "the engine refused the request", "engine_rejected")
    return JobFailedError(job.error_message or "the request failed", job.error_code or "job_failed")


def open_streams():
    carrier = current_app.extensions.get("qe_streams")
    if carrier is None:
        carrier = current_app.extensions.setdefault(
            "qe_streams", streams.open_streams(current_app.extensions["qe_settings"]))
    return carrier


# --- streaming -----------------------------------------------------------------


def stream_answer(endpoint, job_id, include_usage):
    """Wait for the job to start (or answer an error now), then stream its events."""
    carrier = open_streams()
    wait = Wait(job_id)
    position, first = "0", []
    while not first:
        first, position = carrier.read(job_id, position, LOOK_INTERVAL)
        if first:
            break
        job = wait.look()
        if job.status in ENDED and job.status != JobState.SUCCEEDED.value:
            raise job_error(job)
        if job.status == JobState.SUCCEEDED.value:
            break  # it ended between two looks: its answer comes from the database
        wait.check(job)
        if job.status == JobState.RUNNING.value:
            break  # started, but its events are not here (yet): stream from what comes
    streamer = Streamer(endpoint, wait.look(), include_usage, carrier)
    return Response(stream_with_context(streamer.run(first, position)), mimetype="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


class Streamer:
    """Turns one streamed job's events into OpenAI's chunks."""

    def __init__(self, endpoint, job, include_usage, carrier):
        self.endpoint, self.job_id, self.model = endpoint, job.id, job.model
        self.include_usage, self.carrier = include_usage, carrier
        self.created = int(job.created_at.timestamp())
        self.job = job
        self.attempt = None
        self.sent = {}  # choice index -> text sent so far

    def run(self, events, position):
        done = False
        try:
            if self.job.status in ENDED:
                yield from self.finish_from(self.job)
                done = True
                return
            while True:
                for event in events:
                    for chunk in self.on_event(event):
                        if chunk is None:
                            done = True
                            return
                        yield chunk
                events, position = self.carrier.read(self.job_id, position, LOOK_INTERVAL)
                if not events:
                    yield ": waiting\n\n"  # a client that went away shows itself on a write
                    job = self.look()
                    if job.status in ENDED:
                        yield from self.finish_from(job)
                        done = True
                        return
        finally:
            if not done:
                give_up(self.job)

    def on_event(self, event):
        """The chunks one event sends; None ends the stream."""
        kind = event["type"]
        if kind == "start":
            if self.attempt is not None and event["attempt"] != self.attempt and any(self.sent.values()):
                yield self.error_chunk("the worker running this request was lost and it started again; its "
                                       f"answer will be at /api/v1/jobs/{self.job_id}")
                yield None
            self.attempt = event["attempt"]
            self.sent = {}
        elif kind == "delta" and event["attempt"] == self.attempt:
            for choice in event["choices"]:
                yield self.text_chunk(choice["index"], choice["text"], choice["logprobs"])
        elif kind == "end" and event["attempt"] == self.attempt:
            yield from self.final_chunks(event["finish_reasons"], event["prompt_tokens"], event["completion_tokens"])
            yield None
        elif kind == "error":
            job = self.look()
            if job.status in ENDED:
                yield from self.finish_from(job)
                yield None

    def finish_from(self, job):
        """End the stream from the job's row: the text the events missed, then the end."""
        if job.status != JobState.SUCCEEDED.value:
            yield self.error_chunk(str(job_error(job)))
            yield "data: [DONE]\n\n"
            return
        choices = completions.choices(job)
        for index, (text, _, _) in enumerate(choices):
            sent = self.sent.get(index, "")
            if not text.startswith(sent):
                yield self.error_chunk(f"the answer changed while it streamed; read it at /api/v1/jobs/{job.id}")
                yield "data: [DONE]\n\n"
                return
            if text[len(sent):]:
                yield self.text_chunk(index, text[len(sent):], None)
        yield from self.final_chunks([finish for _, finish, _ in choices], job.prompt_tokens or 0,
                                     job.completion_tokens or 0)

    def final_chunks(self, finish_reasons, prompt_tokens, completion_tokens):
        for index, reason in enumerate(finish_reasons):
            yield self.chunk([self.choice(index, None, None, reason)])
        if self.include_usage:
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                     "total_tokens": prompt_tokens + completion_tokens}
            yield self.chunk([], usage=usage)
        yield "data: [DONE]\n\n"

    def text_chunk(self, index, text, logprobs):
        first = index not in self.sent
        self.sent[index] = self.sent.get(index, "") + text
        return self.chunk([self.choice(index, text, logprobs, None, first)])

    def choice(self, index, text, logprobs, finish_reason, first=False):
        if self.endpoint == CHAT:
            delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
            return {"index": index, "delta": delta, "finish_reason": finish_reason,
                    "logprobs": {"content": logprobs} if logprobs else None}
        return {"index": index, "text": text or "", "finish_reason": finish_reason,
                "logprobs": completions.completion_logprobs(logprobs) if logprobs else None}

    def chunk(self, choices, usage=None):
        body = {"id": f"{'chatcmpl' if self.endpoint == CHAT else 'cmpl'}-{self.job_id}",
                "object": "chat.completion.chunk" if self.endpoint == CHAT else "text_completion",
                "created": self.created, "model": self.model, "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    def error_chunk(self, message):
        return f"data: {json.dumps({'error': {'message': message, 'type': 'server_error', 'param': None, 'code': 'stream_error'}})}\n\n"

    def look(self):
        job = get_session().get(Job, self.job_id)
        close_session()
        return job

