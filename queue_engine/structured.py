"""Structured answers: what a ``response_format`` asks for, and whether an answer gives it.

Three shapes constrain the answer and are checked when it ends
(:func:`queue_engine.leases.finish`), besides OpenAI's own:

* ``{"type": "json_schema", "schema": {...}}`` (or OpenAI's
  ``{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}``):
  JSON that follows the schema;
* ``{"type": "choice", "choices": ["yes", "no"]}``: exactly one of the choices;
* ``{"type": "regex", "pattern": "..."}``: text the pattern matches in full.

The engine constrains generation to the format, so an answer fails the check
only when it was cut short (``max_tokens``) or the engine's grammar and these
checks disagree (a regex feature Python reads differently, say).
``json_object`` and ``text`` are not checked, as before.
"""

import json
import re

from jsonschema import exceptions as schema_errors
from jsonschema import validators

#: The ``response_format`` types whose answers are parsed and checked.
CHECKED_TYPES = ("json_schema", "choice", "regex")
#: The error code of a row or job whose answer does not parse or validate.
INVALID_ANSWER = "invalid_answer"


def schema_of(response_format):
    """The JSON Schema of a ``json_schema`` format, in either shape; None for the other types."""
    if not response_format or response_format.get("type") != "json_schema":
        return None
    if response_format.get("schema") is not None:
        return response_format["schema"]
    return (response_format.get("json_schema") or {}).get("schema") or {}


def is_checked(response_format):
    """Whether answers to ``response_format`` are parsed and checked when they end."""
    return bool(response_format) and response_format.get("type") in CHECKED_TYPES


def check_schema(schema):
    """Raise ValueError, saying why, unless ``schema`` is a valid JSON Schema (of its ``$schema`` draft)."""
    try:
        validators.validator_for(schema).check_schema(schema)
    except schema_errors.SchemaError as error:
        where = "/".join(str(part) for part in error.path)
        raise ValueError(f"not a valid JSON Schema: {error.message}" + (f" (at {where!r})" if where else "")) from None


def check_pattern(pattern):
    """Raise ValueError, saying why, unless ``pattern`` compiles as a regular expression."""
    try:
        re.compile(pattern)
    except re.error as error:
        raise ValueError(f"not a valid regular expression: {error}") from None


def property_names(response_format):
    """The top-level properties of a ``json_schema`` format's object schema, in the schema's order;
    empty for any other format (its results get a single ``answer`` column, or none)."""
    schema = schema_of(response_format)
    if not isinstance(schema, dict) or not isinstance(schema.get("properties"), dict):
        return []
    return list(schema["properties"])


def parse_answer(response_format, text):
    """Parse and check one answer.

    Args:
        response_format: the job's ``response_format`` (a dict, as its params store it).
        text: the generated text.

    Returns:
        ``(parsed, error)``: the parsed answer (JSON's value; the text itself for
        a choice or a regex) and None, or None and why the answer is invalid, in
        words. ``(None, None)`` for a format that is not checked.
    """
    if not is_checked(response_format):
        return None, None
    kind = response_format["type"]
    if kind == "json_schema":
        return _parse_json(schema_of(response_format), text)
    if kind == "choice":
        if text in response_format["choices"]:
            return text, None
        return None, f"the answer {_excerpt(text)} is not one of the choices {response_format['choices']!r}"
    if re.fullmatch(response_format["pattern"], text) is not None:
        return text, None
    return None, f"the answer {_excerpt(text)} does not match the pattern {response_format['pattern']!r}"


def parse_answers(response_format, texts):
    """:func:`parse_answer` for each sample of a row: ``(parsed list, error list)``, None where none."""
    checked = [parse_answer(response_format, text) for text in texts]
    return [parsed for parsed, _ in checked], [error for _, error in checked]


def _parse_json(schema, text):
    try:
        value = json.loads(text)
    except ValueError as error:
        return None, f"the answer is not JSON ({error.msg} at character {error.pos} of {len(text)}): {_excerpt(text)}"
    error = schema_errors.best_match(validators.validator_for(schema)(schema).iter_errors(value))
    if error is not None:
        where = "/".join(str(part) for part in error.absolute_path)
        return None, f"the answer does not follow the schema: {error.message}" + (f" (at {where!r})" if where else "")
    return value, None


def _excerpt(text, limit=200):
    return repr(text if len(text) <= limit else text[:limit] + "...")
