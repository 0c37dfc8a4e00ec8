"""OpenAI's response objects, built from a job: ``chat.completion`` for
``/v1/chat/completions`` and ``text_completion`` for ``/v1/completions``.

The synchronous ``/v1`` endpoints answer with them, and a ``/v1`` batch's
output file holds one per line, so both come from here.
"""

from typing import NamedTuple

from pydantic import ValidationError

from . import uploads
from .errors import InvalidFileError, InvalidRequestError
from .inputs import format_location
from .params import Params
from .schemas import JobCreate

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
ENDPOINTS = (CHAT, COMPLETIONS)


def usage(job):
    prompt, completion = job.prompt_tokens or 0, job.completion_tokens or 0
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def completion_logprobs(tokens):
    """A ``text_completion`` choice's logprobs (the legacy shape) from OpenAI's per-token list."""
    offsets, at = [], 0
    for token in tokens:
        offsets.append(at)
        at += len(token["token"])
    return {"tokens": [t["token"] for t in tokens], "token_logprobs": [t["logprob"] for t in tokens],
            "top_logprobs": [{p["token"]: p["logprob"] for p in t["top_logprobs"]} for t in tokens],
            "text_offset": offsets}


def choices(job):
    """``(text, finish_reason, per-token logprobs or None)`` of each choice: ``job.output``'s when
    the job asked for more than one answer or for logprobs, else its one answer."""
    if job.output and job.output.get("choices"):
        return [(c["text"], c["finish_reason"], c.get("logprobs")) for c in job.output["choices"]]
    return [(job.result_text, job.finish_reason, None)]


def response_body(endpoint, job):
    """The body OpenAI's ``endpoint`` answers with, for a job that succeeded.

    ``job`` needs ``id``, ``model``, ``created_at``, ``result_text``,
    ``finish_reason``, ``prompt_tokens``, ``completion_tokens`` and ``output``
    (a job row or a row of a query).
    """
    created = int(job.created_at.timestamp())
    if endpoint == CHAT:
        answers = [{"index": i, "message": {"role": "assistant", "content": text},
                    "logprobs": None if tokens is None else {"content": tokens}, "finish_reason": finish}
                   for i, (text, finish, tokens) in enumerate(choices(job))]
        return {"id": f"chatcmpl-{job.id}", "object": "chat.completion", "created": created, "model": job.model,
                "choices": answers, "usage": usage(job)}
    answers = [{"index": i, "text": text, "logprobs": None if tokens is None else completion_logprobs(tokens),
                "finish_reason": finish}
               for i, (text, finish, tokens) in enumerate(choices(job))]
    return {"id": f"cmpl-{job.id}", "object": "text_completion", "created": created, "model": job.model,
            "choices": answers, "usage": usage(job)}


# --- requests ----------------------------------------------------------------

#: OpenAI request fields this service knows and does not support: a 400 names them.
UNSUPPORTED = ("tools", "tool_choice", "functions", "function_call", "parallel_tool_calls", "logit_bias", "audio",
               "modalities", "prediction", "best_of", "echo", "suffix", "web_search_options", "reasoning_effort")
#: OpenAI request fields accepted and ignored: they change nothing about the answer.
IGNORED = ("user", "store", "service_tier")
#: What is not a sampling parameter in a request body.
REQUEST_KEYS = {"model", "messages", "prompt", "stream", "stream_options", "metadata"}
#: OpenAI's newer and older names for the same parameter.
ALIASES = {"max_completion_tokens": "max_tokens"}
#: OpenAI's "developer" messages are system messages to a model of this service.
ROLES = {"developer": "system"}


class CompletionRequest(NamedTuple):
    """A ``/v1/chat/completions`` or ``/v1/completions`` request: the job it
    becomes, and how the answer is to be sent."""

    job: JobCreate
    stream: bool
    include_usage: bool


def read_request(endpoint, body):
    """The :class:`CompletionRequest` of an OpenAI request ``body`` to ``endpoint``.

    Raises:
        InvalidRequestError: naming the field at fault (``param``), in OpenAI's names.
    """
    for name in body:
        if name in UNSUPPORTED:
            raise InvalidRequestError(f"{name} is not supported by this server", "unsupported_parameter", name)
        if name not in REQUEST_KEYS and name not in IGNORED and ALIASES.get(name, name) not in Params.model_fields:
            raise InvalidRequestError(f"{name} is not a parameter of {endpoint}", "unknown_parameter", name)
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise InvalidRequestError("stream must be true or false", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or not set(options) <= {"include_usage"}:
        raise InvalidRequestError('stream_options must be {"include_usage": true|false}', param="stream_options")
    params = {name: value for name, value in body.items()
              if name not in REQUEST_KEYS and name not in IGNORED}
    job = {"model": body.get("model"), "params": params, "metadata": body.get("metadata")}
    if endpoint == CHAT:
        job["messages"] = _messages(body.get("messages"))
    else:
        job["prompt"] = _prompt(body.get("prompt"))
    try:
        request = JobCreate.model_validate(job)
    except ValidationError as e:
        problem = e.errors()[0]
        name = format_location(loc for loc in problem["loc"] if loc != "params")
        raise InvalidRequestError(f"{name}: {problem['msg'].removeprefix('Value error, ')}", param=name) from None
    return CompletionRequest(request, stream, bool(options.get("include_usage")))


def _messages(messages):
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("messages must be a non-empty list of {role, content}", param="messages")
    chat = []
    for number, message in enumerate(messages):
        if isinstance(message, dict) and message.get("role") in ROLES:
            message = {**message, "role": ROLES[message["role"]]}
        if isinstance(message, dict):
            message = {key: value for key, value in message.items() if key != "name"}
        try:
            chat.append(uploads.chat_message(message, None, f"messages.{number}"))
        except InvalidFileError as e:
            raise InvalidRequestError(e.problem, param=e.column) from None
    return chat


def _prompt(prompt):
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise InvalidRequestError("prompt must be one string (send many prompts as a batch: /v1/batches)",
                                  param="prompt")
    return prompt
