"""OpenAI's response objects, built from a job: ``chat.completion`` for
``/v1/chat/completions`` and ``text_completion`` for ``/v1/completions``.

The synchronous ``/v1`` endpoints answer with them, and a ``/v1`` batch's
output file holds one per line, so both come from here.
"""

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
ENDPOINTS = (CHAT, COMPLETIONS)


def usage(job):
    prompt, completion = job.prompt_tokens or 0, job.completion_tokens or 0
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _completion_logprobs(tokens):
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
    answers = [{"index": i, "text": text, "logprobs": None if tokens is None else _completion_logprobs(tokens),
                "finish_reason": finish}
               for i, (text, finish, tokens) in enumerate(choices(job))]
    return {"id": f"cmpl-{job.id}", "object": "text_completion", "created": created, "model": job.model,
            "choices": answers, "usage": usage(job)}
