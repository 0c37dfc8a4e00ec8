"""Structured answers: parsing and checking each response_format type, and
refusing a format that cannot be followed at submission (400 naming it)."""

import io
import json

import pytest

from queue_engine.structured import parse_answer, property_names

SCHEMA = {"type": "object", "properties": {"label": {"enum": ["pos", "neg"]}, "score": {"type": "integer"}},
          "required": ["label", "score"]}


@pytest.mark.parametrize("response_format, text, parsed", [
    ({"type": "json_schema", "schema": SCHEMA}, '{"label":"pos","score":3}', {"label": "pos", "score": 3}),
    ({"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMA}}, '{"label":"neg","score":0}',
     {"label": "neg", "score": 0}),
    ({"type": "choice", "choices": ["yes", "no"]}, "no", "no"),
    ({"type": "regex", "pattern": r"[0-9]{3}"}, "123", "123"),
])
def test_parse_answer_gives_the_parsed_value_of_a_valid_answer(response_format, text, parsed):
    """A valid answer comes back parsed, with no error."""
    assert parse_answer(response_format, text) == (parsed, None)


@pytest.mark.parametrize("response_format, text, why", [
    ({"type": "json_schema", "schema": SCHEMA}, '{"label":"pos","sc', "not JSON"),
    ({"type": "json_schema", "schema": SCHEMA}, '{"label":"meh","score":3}', "does not follow the schema"),
    ({"type": "json_schema", "schema": SCHEMA}, '{"label":"pos"}', "'score' is a required property"),
    ({"type": "choice", "choices": ["yes", "no"]}, "maybe", "not one of the choices"),
    ({"type": "regex", "pattern": r"[0-9]{3}"}, "1234", "does not match the pattern"),
])
def test_parse_answer_says_why_an_answer_is_invalid(response_format, text, why):
    """An invalid answer gives no value and an error in words."""
    parsed, error = parse_answer(response_format, text)
    assert parsed is None and why in error


@pytest.mark.parametrize("response_format", [None, {"type": "text"}, {"type": "json_object"}])
def test_parse_answer_leaves_unchecked_formats_alone(response_format):
    """Free text and json_object answers are not checked."""
    assert parse_answer(response_format, "anything") == (None, None)


def test_property_names_follow_the_schema_order():
    """The result columns are the top-level properties, in the schema's order."""
    assert property_names({"type": "json_schema", "schema": SCHEMA}) == ["label", "score"]
    assert property_names({"type": "choice", "choices": ["a"]}) == []


@pytest.mark.parametrize("response_format, param", [
    ({"type": "json_schema", "schema": {"type": "nope"}}, "params.response_format.schema"),
    ({"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": 3}}},
     "params.response_format.json_schema"),
    ({"type": "choice", "choices": []}, "params.response_format.choices"),
    ({"type": "choice"}, "params.response_format"),
    ({"type": "regex", "pattern": "(unclosed"}, "params.response_format.pattern"),
    ({"type": "json_schema", "schema": SCHEMA, "json_schema": {"name": "s", "schema": SCHEMA}},
     "params.response_format"),
])
def test_a_job_with_a_format_that_cannot_be_followed_is_refused(client, auth, response_format, param):
    """A schema that is not a JSON Schema, no choices or a regex that does not compile: 400 naming the field."""
    response = client.post("/api/v1/jobs", headers=auth, json={
        "model": "tiny", "prompt": "hi", "params": {"response_format": response_format}})
    assert response.status_code == 400
    assert response.get_json()["error"]["param"] == param


def test_a_batch_with_a_bad_schema_is_refused(client, auth):
    """A batch's params are checked the same way."""
    form = {"model": "tiny", "params": json.dumps({"response_format": {"type": "regex", "pattern": "["}}),
            "file": (io.BytesIO(b"prompt\nhi\n"), "rows.csv")}
    response = client.post("/api/v1/batches", headers=auth, data=form, content_type="multipart/form-data")
    assert response.status_code == 400 and "regular expression" in response.get_json()["error"]["message"]
    assert response.get_json()["error"]["param"] == "params.response_format.pattern"


@pytest.mark.parametrize("response_format", [
    {"type": "json_schema", "schema": SCHEMA},
    {"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMA}},
    {"type": "json_object"},
    {"type": "choice", "choices": ["yes", "no"]},
    {"type": "regex", "pattern": "[a-z]+"},
])
def test_a_job_with_a_followable_format_is_accepted_and_kept(client, auth, response_format):
    """Every shape is accepted and stored as given (the worker maps it to vLLM's structured outputs)."""
    response = client.post("/api/v1/jobs", headers=auth, json={
        "model": "tiny", "prompt": "hi", "params": {"response_format": response_format}})
    assert response.status_code == 202, response.get_json()


def test_sampling_args_map_each_format_to_structured_outputs():
    """json_schema (both shapes), choice and regex become vLLM's StructuredOutputsParams."""
    from workers.engine import sampling_args

    outputs = [sampling_args({"response_format": rf})["structured_outputs"] for rf in (
        {"type": "json_schema", "schema": SCHEMA}, {"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMA}},
        {"type": "choice", "choices": ["yes", "no"]}, {"type": "regex", "pattern": "[0-9]+"})]
    assert outputs[0].json == SCHEMA and outputs[1].json == SCHEMA
    assert outputs[2].choice == ["yes", "no"] and outputs[3].regex == "[0-9]+"
