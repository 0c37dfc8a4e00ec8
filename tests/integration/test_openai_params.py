"""OpenAI's parameters on the real engine (the CPU build of vLLM, the tiny model, in
this process): n, logprobs and response_format mapped to SamplingParams, and what
the Generation carries into ``Job.output`` and the OpenAI response objects."""

import json
from datetime import datetime, timezone
from types import SimpleNamespace

import pytest

from queue_engine import completions
from queue_engine.params import Params
from tests.integration.test_engine_preemption import engine  # noqa: F401 (the module's engine fixture)
from workers.engine import GenerationRequest


def generate(engine, request_id, prompt, **params):  # noqa: F811
    engine.add(GenerationRequest(request_id=request_id, prompt=prompt,
                                 params=Params.model_validate(params).model_dump()))
    while True:
        for finished_id, generation in engine.step():
            if finished_id == request_id:
                return generation


def as_job(generation):
    return SimpleNamespace(id="j1", model="tiny", created_at=datetime.now(timezone.utc), prompt_tokens=3,
                           result_text=generation.text, finish_reason=generation.finish_reason,
                           completion_tokens=generation.completion_tokens, output=generation.output)


def test_plain_requests_carry_no_extra_output(engine):  # noqa: F811
    """A request without n or logprobs carries nothing for Job.output."""
    generation = generate(engine, "plain", "Hello", max_tokens=4, temperature=0)
    assert generation.output is None and generation.completion_tokens <= 4


def test_n_samples_and_logprobs_reach_the_response_objects(engine):  # noqa: F811
    """n=2 with logprobs: both answers and their token logprobs reach chat and completion objects."""
    generation = generate(engine, "n2", "Hello", max_tokens=5, temperature=1, seed=3, n=2, logprobs=True,
                          top_logprobs=2, presence_penalty=0.5, frequency_penalty=0.5)
    chosen = generation.output["choices"]
    assert len(chosen) == 2 and chosen[0]["text"] == generation.text
    assert generation.completion_tokens == sum(len(c["logprobs"]) for c in chosen)
    for token in chosen[0]["logprobs"]:
        assert token["logprob"] <= 0 and len(token["top_logprobs"]) == 2
    chat = completions.response_body(completions.CHAT, as_job(generation))
    assert [c["index"] for c in chat["choices"]] == [0, 1]
    assert chat["choices"][1]["logprobs"]["content"] == chosen[1]["logprobs"]
    text = completions.response_body(completions.COMPLETIONS, as_job(generation))
    first = text["choices"][0]["logprobs"]
    assert "".join(first["tokens"]) == generation.text or len(first["tokens"]) == len(chosen[0]["logprobs"])
    assert first["text_offset"][0] == 0


SCHEMA = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}}, "required": ["answer"],
          "additionalProperties": False}


def test_json_schema_answers_validate_and_a_short_budget_is_reported_honestly(engine):  # noqa: F811
    """A finished json_schema answer validates; one cut short says length and is not JSON."""
    jsonschema = pytest.importorskip("jsonschema")
    response_format = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": SCHEMA, "strict": True}}
    done = generate(engine, "schema", "Is water wet?", max_tokens=200, temperature=0, response_format=response_format)
    assert done.finish_reason == "stop", done.text
    jsonschema.validate(json.loads(done.text), SCHEMA)
    short = generate(engine, "short", "Is water wet?", max_tokens=2, temperature=0, response_format=response_format)
    assert short.finish_reason == "length"
    with pytest.raises(json.JSONDecodeError):
        json.loads(short.text)
