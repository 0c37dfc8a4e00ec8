"""Sampling parameters, by OpenAI's names, as every path takes them (jobs,
batches, tribunals, /v1), and the strict text and model types the API's
shapes (``queue_engine.schemas``) are built from."""

from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_serializer, model_validator

from . import structured
from .inputs import check_text

#: vLLM seeds a torch generator with it, which takes 64 bits; a tribunal adds its candidates' numbers.
MAX_SEED = 2**63 - 1
#: A bound for sanity; the model's context length, checked with the settings, is the real limit.
MAX_TOKENS_CEILING = 2**31 - 1


def text_type(**constraints):
    """A string type that :func:`~queue_engine.inputs.check_text` guards, with pydantic's ``Field`` ``constraints``.

    The constraints sit on the string itself, before the check: added on
    top of a validator they would read "at most 64 items after validation".
    """
    return Annotated[str, Field(**constraints), BeforeValidator(check_text)]


class StrictModel(BaseModel):
    # Strict: JSON's "5" is not 5, true is not 1, and 1 is not "1".
    model_config = ConfigDict(extra="forbid", strict=True)


#: Most samples one request may ask for (``n``).
MAX_N = 16
#: Most alternatives per token ``top_logprobs`` (and a completion's ``logprobs``) may ask for, as OpenAI.
MAX_TOP_LOGPROBS = 20


class JsonSchemaFormat(StrictModel):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True, serialize_by_alias=True)

    name: text_type(min_length=1, max_length=64) = Field(description="the schema's name")
    schema_: dict = Field(default_factory=dict, alias="schema", description="a JSON Schema the answer must follow")
    description: text_type(max_length=4096) | None = None
    strict: bool | None = Field(None, description="accepted; the answer always follows the schema")


#: Most choices a ``choice`` format may list.
MAX_CHOICES = 1024


class ResponseFormat(StrictModel):
    """``response_format``: free text, any JSON object, JSON following a schema (OpenAI's
    ``json_schema`` object, or the schema itself as ``schema``), one of ``choices``, or text
    matching ``pattern`` (``queue_engine.structured`` checks the answers)."""

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True, serialize_by_alias=True)

    type: Literal["text", "json_object", "json_schema", "choice", "regex"]
    json_schema: JsonSchemaFormat | None = Field(None, description="OpenAI's shape: a name and a schema")
    schema_: dict | None = Field(None, alias="schema", description="type json_schema: the JSON Schema itself")
    choices: list[text_type(min_length=1, max_length=4096)] | None = Field(
        None, max_length=MAX_CHOICES, description="type choice: the answers allowed")
    pattern: text_type(min_length=1, max_length=4096) | None = Field(
        None, description="type regex: a regular expression the whole answer matches")

    @field_validator("schema_")
    @classmethod
    def _valid_schema(cls, schema):
        if schema is not None:
            structured.check_schema(schema)
        return schema

    @field_validator("json_schema")
    @classmethod
    def _valid_openai_schema(cls, json_schema):
        if json_schema is not None:
            try:
                structured.check_schema(json_schema.schema_)
            except ValueError as error:
                raise ValueError(f"schema: {error}") from None
        return json_schema

    @field_validator("choices")
    @classmethod
    def _some_choices(cls, choices):
        if choices is not None and not choices:
            raise ValueError("give at least one choice")
        return choices

    @field_validator("pattern")
    @classmethod
    def _valid_pattern(cls, pattern):
        if pattern is not None:
            structured.check_pattern(pattern)
        return pattern

    @model_validator(mode="after")
    def _fields_of_its_type(self):
        if self.type == "json_schema" and (self.json_schema is None) == (self.schema_ is None):
            raise ValueError("type 'json_schema' takes exactly one of json_schema (OpenAI's) or schema")
        if self.type != "json_schema" and (self.json_schema is not None or self.schema_ is not None):
            raise ValueError("give json_schema or schema only when type is 'json_schema'")
        if (self.type == "choice") != (self.choices is not None):
            raise ValueError("give choices exactly when type is 'choice'")
        if (self.type == "regex") != (self.pattern is not None):
            raise ValueError("give pattern exactly when type is 'regex'")
        return self

    @model_serializer(mode="wrap")
    def _without_unset(self, handler):
        return {name: value for name, value in handler(self).items() if value is not None}


#: Parameters added for OpenAI's names, and the value that means "not asked":
#: a job stores them only when asked, so bulk rows' params stay as small as before.
OPTIONAL_PARAMS = {"n": 1, "presence_penalty": 0.0, "frequency_penalty": 0.0, "logprobs": None,
                   "top_logprobs": None, "response_format": None}


def _one_or_more(value):
    return [value] if isinstance(value, str) else value


class Params(StrictModel):
    """Sampling parameters, by OpenAI's names. Unknown keys are refused."""

    max_tokens: int = Field(256, ge=1, le=MAX_TOKENS_CEILING,
                            description="tokens to generate, at most the model's context length")
    max_completion_tokens: int | None = Field(
        None, ge=1, le=MAX_TOKENS_CEILING, exclude=True, description="OpenAI's newer name for max_tokens")
    temperature: float = Field(1.0, ge=0, le=2, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    stop: Annotated[list[text_type(min_length=1)] | None, BeforeValidator(_one_or_more)] = Field(
        None, max_length=16, description="strings that end generation (OpenAI's single string is one of them)")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="makes sampling reproducible")
    n: int = Field(1, ge=1, le=MAX_N, description="answers to sample for the prompt")
    presence_penalty: float = Field(0.0, ge=-2, le=2, allow_inf_nan=False)
    frequency_penalty: float = Field(0.0, ge=-2, le=2, allow_inf_nan=False)
    logprobs: bool | int | None = Field(
        None, description="chat: true for each token's log probability (top_logprobs: how many alternatives); "
                          "completions: the number of alternatives per token")
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS,
                                     description="alternatives per token, with logprobs: true")
    response_format: ResponseFormat | None = Field(
        None, description="text, json_object, json_schema, choice or regex: the answer is constrained "
                          "(vLLM's structured outputs); json_schema, choice and regex answers are checked when "
                          "they end (error invalid_answer)")

    @field_validator("logprobs")
    @classmethod
    def _logprobs_in_range(cls, logprobs):
        if type(logprobs) is int and not 0 <= logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"must be true, false or a number of alternatives from 0 to {MAX_TOP_LOGPROBS}")
        return logprobs

    @model_validator(mode="after")
    def _openai_aliases(self):
        if self.max_completion_tokens is not None:
            if "max_tokens" in self.model_fields_set and self.max_tokens != self.max_completion_tokens:
                raise ValueError("give max_tokens or max_completion_tokens, not both")
            self.max_tokens = self.max_completion_tokens
        if self.top_logprobs is not None and self.logprobs is not True:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    @model_serializer(mode="wrap")
    def _only_what_was_asked(self, handler):
        data = handler(self)
        for name, unasked in OPTIONAL_PARAMS.items():
            if name in data and data[name] == unasked:
                del data[name]
        if data.get("response_format") == {"type": "text"}:
            del data["response_format"]
        return data
