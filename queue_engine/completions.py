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


def response_body(endpoint, job):
    """The body OpenAI's ``endpoint`` answers with, for a job that succeeded.

    ``job`` needs ``id``, ``model``, ``created_at``, ``result_text``,
    ``finish_reason``, ``prompt_tokens``, ``completion_tokens`` and ``output``
    (a job row or a row of a query).
    """
    created = int(job.created_at.timestamp())
    if endpoint == CHAT:
        choice = {"index": 0, "message": {"role": "assistant", "content": job.result_text},
                  "logprobs": None, "finish_reason": job.finish_reason}
        return {"id": f"chatcmpl-{job.id}", "object": "chat.completion", "created": created, "model": job.model,
                "choices": [choice], "usage": usage(job)}
    choice = {"index": 0, "text": job.result_text, "logprobs": None, "finish_reason": job.finish_reason}
    return {"id": f"cmpl-{job.id}", "object": "text_completion", "created": created, "model": job.model,
            "choices": [choice], "usage": usage(job)}
