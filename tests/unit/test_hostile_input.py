"""Hostile input never reaches a 500: at every entry point (job and tribunal
bodies, a batch's form fields and ``params``, every JSONL line, every CSV
cell, headers, paths and query strings) it is a 400 naming the field (or the
file's line and column), and nothing is stored or sent to the broker.

Every test runs on SQLite and on PostgreSQL: only PostgreSQL refuses NUL.
"""

import csv
import io
import json
import logging
from types import SimpleNamespace

import jsonschema
import pytest
from sqlalchemy import func, select

from queue_engine import results
from queue_engine.models import Batch, Job
from queue_engine.settings import load_settings
from tests.helpers import assert_matches_openapi, free_port
from web import create_app

NUL, SURROGATE = "\x00", "\ud800"
BAD_TEXT = [
    pytest.param(NUL, "NUL character", id="nul"),
    pytest.param(SURROGATE, "unpaired UTF-16 surrogate", id="surrogate"),
]
JOB = {"model": "tiny", "prompt": "hi"}
TRIBUNAL = {"prompt": "hi", "candidates": ["tiny", "tiny"], "judge": "tiny"}


@pytest.fixture
def app(make_app):
    # Room for bodies of thousands of digits or brackets; the 413 for larger ones is tested in test_api.
    return make_app(max_body_bytes=1 << 16)


def stored(app):
    with app.extensions["qe_sessions"]() as session:
        return session.scalar(select(func.count(Job.id))) + session.scalar(select(func.count(Batch.id)))


def assert_refused(app, broker, response, words, status=400):
    """``response`` is a JSON ``status`` whose message holds each of ``words``; nothing was kept or sent."""
    error = response.get_json()["error"]
    assert response.status_code == status, error
    for word in words:
        assert word in error["message"], error
    assert stored(app) == 0
    assert broker.dbsize() == 0
    return error


def post_json(client, auth, path, text, content_type="application/json"):
    """POST the raw ``text`` (JSON that the test client's encoder could not write, such as NaN)."""
    return client.post(path, data=text.encode(), headers={**auth, "Content-Type": content_type})


def upload(client, auth, data, filename="rows.csv", **fields):
    data = data.encode() if isinstance(data, str) else data
    form = {"model": "tiny", **fields, "file": (io.BytesIO(data), filename)}
    return client.post("/api/v1/batches", data=form, headers=auth, content_type="multipart/form-data")


def jsonl_line(custom_id="a", **body):
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/completions", "body": body})


# --- sampling parameters, in each of the four places they come in ------------------

PARAMS_ENTRIES = ["job", "tribunal", "batch params", "jsonl line"]


def send_params(client, auth, entry, params_text):
    """Submit ``params_text`` (raw JSON text of a params object) through ``entry``."""
    if entry == "job":
        return post_json(client, auth, "/api/v1/jobs", '{"model": "tiny", "prompt": "hi", "params": %s}' % params_text)
    if entry == "tribunal":
        return post_json(client, auth, "/api/v1/tribunals",
                         '{"prompt": "hi", "candidates": ["tiny"], "judge": "tiny", "params": %s}' % params_text)
    if entry == "batch params":
        return upload(client, auth, "prompt\nhi\n", params=params_text)
    # A JSONL body carries the parameters beside the prompt.
    line = '{"custom_id": "a", "body": {"prompt": "hi", %s}' % params_text.removeprefix("{")
    return upload(client, auth, line + "\n", filename="rows.jsonl")


def params_field(entry, field):
    return f"line 1, column 'body.{field}'" if entry == "jsonl line" else f"params.{field}"


@pytest.mark.parametrize("entry", PARAMS_ENTRIES)
@pytest.mark.parametrize("params_text, field, words", [
    pytest.param('{"seed": %s}' % ("9" * 4000), "seed", "less than or equal to 9223372036854775807",
                 id="4000-digit seed"),
    pytest.param('{"seed": -%s}' % ("9" * 5000), "seed", "greater than or equal to 0", id="5000-digit negative seed"),
    pytest.param('{"max_tokens": %s}' % ("9" * 5000), "max_tokens", "less than or equal to 2147483647",
                 id="5000-digit max_tokens"),
    pytest.param('{"temperature": %s}' % ("9" * 4000), "temperature", "less than or equal to 2",
                 id="4000-digit temperature"),
    pytest.param('{"temperature": 1e999}', "temperature", "finite number", id="float overflow"),
    pytest.param('{"seed": -1}', "seed", "greater than or equal to 0", id="negative seed"),
    pytest.param('{"max_tokens": "5"}', "max_tokens", "valid integer", id="string for int"),
    pytest.param('{"max_tokens": true}', "max_tokens", "valid integer", id="boolean for int"),
    pytest.param('{"max_tokens": 5.5}', "max_tokens", "valid integer", id="fraction for int"),
    pytest.param('{"max_tokens": 5.0}', "max_tokens", "valid integer", id="float for int"),
    pytest.param('{"temperature": "0.5"}', "temperature", "valid number", id="string for float"),
    pytest.param('{"seed": null, "top_p": false}', "top_p", "valid number", id="boolean for float"),
    pytest.param('{"stop": 5}', "stop", "valid list", id="number for list"),
    pytest.param('{"stop": [1]}', "stop.0", "valid string", id="number for string"),
    pytest.param('{"stop": ["\\u0000"]}', "stop.0", "NUL character", id="NUL stop string"),
    pytest.param('{"stop": ["a\\ud800"]}', "stop.0", "unpaired UTF-16 surrogate (\\ud800) at character 2",
                 id="lone surrogate stop string"),
])
def test_bad_params_are_a_400_naming_the_field_wherever_they_come_in(app, client, auth, broker, entry,
                                                                    params_text, field, words):
    """Huge numbers, lax coercions and unfit text in ``params`` are refused by name at every entry point."""
    response = send_params(client, auth, entry, params_text)
    error = assert_refused(app, broker, response, [f"{params_field(entry, field)}: ", words])
    assert error["param"] == ("file" if entry == "jsonl line" else f"params.{field}")


@pytest.mark.parametrize("entry", PARAMS_ENTRIES)
@pytest.mark.parametrize("value", [
    pytest.param("[" * 40 + "]" * 40, id="40 levels"),
    pytest.param("[" * 5000 + "]" * 5000, id="5000 levels, past the decoder's recursion"),
])
def test_deeply_nested_json_is_a_400_wherever_it_comes_in(app, client, auth, broker, entry, value):
    """Deep nesting is refused (Python's decoder raises RecursionError, not ValueError)."""
    response = send_params(client, auth, entry, '{"seed": %s}' % value)
    assert_refused(app, broker, response, ["nested more than 32 levels deep"])


@pytest.mark.parametrize("path", ["/api/v1/jobs", "/api/v1/tribunals"])
@pytest.mark.parametrize("text, words", [
    pytest.param("[" * 5000 + "]" * 5000, "nested more than 32 levels deep", id="deep array body"),
    pytest.param('{"model": "tiny", "prompt": "hi", "params": {"temperature": NaN}}', "NaN is not a JSON number",
                 id="NaN"),
    pytest.param('{"model": "tiny", "prompt": "hi", "params": {"top_p": -Infinity}}',
                 "-Infinity is not a JSON number", id="Infinity"),
    pytest.param('{"model": "tiny", "prompt": "hi"', "not valid JSON", id="truncated"),
])
def test_json_bodies_that_are_not_plain_json_are_refused(app, client, auth, broker, spec, path, text, words):
    """Bodies too deep to decode, or holding NaN or Infinity, are a 400 invalid_json."""
    response = post_json(client, auth, path, text)
    assert assert_refused(app, broker, response, [words])["code"] == "invalid_json"
    assert_matches_openapi(spec, path, "post", response)


@pytest.mark.parametrize("path", ["/api/v1/jobs", "/api/v1/tribunals"])
def test_a_json_body_that_is_not_utf8_is_a_400_naming_the_byte(app, client, auth, broker, path):
    """Latin-1 bytes are not guessed at: the answer shows the first bad byte and where it is."""
    data = b'{"model": "tiny", "prompt": "caf\xe9"}'
    response = client.post(path, data=data, headers={**auth, "Content-Type": "application/json"})
    error = assert_refused(app, broker, response, ["not UTF-8 (byte 0xe9 at position 33)"])
    assert error["code"] == "invalid_json"


# --- text fields: NUL and lone surrogates --------------------------------------------

TEXT_FIELDS = [
    pytest.param("/api/v1/jobs", lambda bad: {**JOB, "prompt": f"hi{bad}"}, "prompt", id="job prompt"),
    pytest.param("/api/v1/jobs", lambda bad: {"model": "tiny", "messages": [{"role": "user", "content": bad}]},
                 "messages.0.content", id="job message"),
    pytest.param("/api/v1/jobs", lambda bad: {**JOB, "metadata": {f"k{bad}": "v"}}, "metadata: the key",
                 id="job metadata key"),
    pytest.param("/api/v1/jobs", lambda bad: {**JOB, "metadata": {"k": bad}}, "metadata.k", id="job metadata value"),
    pytest.param("/api/v1/jobs", lambda bad: {**JOB, "webhook_url": f"http://93.184.215.14/{bad}"}, "webhook_url",
                 id="job webhook_url"),
    pytest.param("/api/v1/jobs", lambda bad: {**JOB, "model": f"tiny{bad}"}, "model", id="job model"),
    pytest.param("/api/v1/jobs", lambda bad: {**JOB, f"x{bad}": 1}, "the key", id="job unknown key"),
    pytest.param("/api/v1/tribunals", lambda bad: {**TRIBUNAL, "prompt": bad}, "prompt", id="tribunal prompt"),
    pytest.param("/api/v1/tribunals", lambda bad: {**TRIBUNAL, "candidates": ["tiny", bad]}, "candidates.1",
                 id="tribunal candidate"),
    pytest.param("/api/v1/tribunals", lambda bad: {**TRIBUNAL, "judge": bad}, "judge", id="tribunal judge"),
    pytest.param("/api/v1/tribunals", lambda bad: {**TRIBUNAL, "reviser": bad}, "reviser", id="tribunal reviser"),
]


@pytest.mark.parametrize("bad, words", BAD_TEXT)
@pytest.mark.parametrize("path, make_body, field", TEXT_FIELDS)
def test_nul_and_lone_surrogates_in_json_bodies_are_a_400_naming_the_field(app, client, auth, broker, spec,
                                                                          path, make_body, field, bad, words):
    """JSON's "\\u0000" and "\\ud800" decode to text no database (or UTF-8 answer) can hold."""
    response = client.post(path, json=make_body(bad), headers=auth)
    error = assert_refused(app, broker, response, [f"{field}", words])
    assert error["message"].startswith(field)
    assert_matches_openapi(spec, path, "post", response)


def test_paired_surrogates_and_other_unicode_are_accepted(app, client, auth, broker):
    """Only unpaired surrogates are refused: JSON's "\\ud83d\\ude00" is one emoji, kept as sent."""
    text = '{"model": "tiny", "prompt": "caf\\u00e9 \\ud83d\\ude00 \\u2028 \\t", "metadata": {"\\u00fc": "\\ud83d\\ude00"}}'
    response = post_json(client, auth, "/api/v1/jobs", text)
    assert response.status_code == 202, response.get_json()
    job = client.get(f"/api/v1/jobs/{response.get_json()['id']}", headers=auth).get_json()
    assert job["metadata"] == {"\u00fc": "\U0001f600"}
    with app.extensions["qe_sessions"]() as session:
        assert session.scalar(select(Job.prompt)) == "caf\u00e9 \U0001f600 \u2028 \t"


JSONL_TEXT = [
    pytest.param(lambda bad: jsonl_line(f"a{bad}", prompt="hi"), "custom_id", id="custom_id"),
    pytest.param(lambda bad: jsonl_line(prompt=bad), "body.prompt", id="prompt"),
    pytest.param(lambda bad: jsonl_line(messages=[{"role": "user", "content": [{"type": "text", "text": bad}]}]),
                 "body.messages.0.content.0.text", id="message part"),
    pytest.param(lambda bad: jsonl_line(prompt="hi", stop=["x", bad]), "body.stop.1", id="stop"),
    pytest.param(lambda bad: jsonl_line(prompt="hi", **{bad: 1}), "body", id="key"),
]


@pytest.mark.parametrize("bad, words", BAD_TEXT)
@pytest.mark.parametrize("make_line, column", JSONL_TEXT)
def test_nul_and_lone_surrogates_in_a_jsonl_line_refuse_the_file_naming_line_and_column(
        app, client, auth, broker, make_line, column, bad, words):
    """Any string of any line, keys too: the whole upload is refused, naming where."""
    data = jsonl_line("ok", prompt="fine") + "\n" + make_line(bad) + "\n"
    response = upload(client, auth, data, filename="rows.jsonl")
    error = assert_refused(app, broker, response, [f"line 2, column {column!r}: ", words])
    assert error["code"] == "invalid_file"


@pytest.mark.parametrize("data, where", [
    pytest.param("id,prompt\n1,hi\n2,h\x00i\n", "line 3, column 'prompt'", id="prompt cell"),
    pytest.param("id,prompt\n1\x00,hi\n", "line 2, column 'id'", id="id cell"),
    pytest.param("id,prompt,note\n1,hi,\x00\n", "line 2, column 'note'", id="unused cell"),
    pytest.param('id,prompt\n1,"two\nli\x00nes"\n', "line 3, column 'prompt'", id="multi-line cell"),
    pytest.param("id,pro\x00mpt\n1,hi\n", "line 1, column 2", id="header cell"),
])
def test_a_nul_in_any_csv_cell_refuses_the_file_naming_line_and_column(app, client, auth, broker, data, where):
    """PostgreSQL cannot store NUL, so a CSV holding one is refused whole (surrogates cannot be UTF-8 at all)."""
    response = upload(client, auth, data)
    assert_refused(app, broker, response, [f"{where}: contains a NUL character"])


@pytest.mark.parametrize("fields, field", [
    ({"model": "ti\x00ny"}, "model"),
    ({"prompt_column": "pro\x00mpt"}, "prompt_column"),
    ({"id_column": "i\x00d"}, "id_column"),
    ({"delimiter": "\x00"}, "delimiter"),
    ({"webhook_url": "http://93.184.215.14/\x00"}, "webhook_url"),
])
def test_a_nul_in_a_batch_form_field_is_a_400_naming_it(app, client, auth, broker, spec, fields, field):
    """Form fields arrive as text; a NUL in one is refused like one in JSON."""
    response = upload(client, auth, "prompt\nhi\n", **fields)
    error = assert_refused(app, broker, response, [f"{field}: contains a NUL character"])
    assert error["param"] == field
    assert_matches_openapi(spec, "/api/v1/batches", "post", response)


def test_a_nul_in_the_uploaded_file_name_is_a_400(app, client, auth, broker):
    """The file name is stored with the batch, so it is text like any field."""
    response = upload(client, auth, "prompt\nhi\n", filename="rows\x00.csv")
    assert assert_refused(app, broker, response, ["file: the file name contains a NUL character"])["param"] == "file"


def test_a_file_name_that_is_not_utf8_is_a_400_that_says_so(app, client, auth, broker):
    """Werkzeug drops the whole form when a file name is not UTF-8; the answer hints at it."""
    body = (b'--B\r\nContent-Disposition: form-data; name="model"\r\n\r\ntiny\r\n'
            b'--B\r\nContent-Disposition: form-data; name="file"; filename="caf\xe9.csv"\r\n\r\nprompt\nhi\n\r\n'
            b'--B--\r\n')
    response = client.post("/api/v1/batches", data=body, headers=auth, content_type="multipart/form-data; boundary=B")
    error = assert_refused(app, broker, response, ["are the field names and the file name UTF-8?"])
    assert error["code"] == "missing_file"


def test_a_nul_in_the_idempotency_key_is_a_400(app, client, auth, broker):
    """The key is stored with the job; a NUL (or any control character) is refused by name."""
    response = client.post("/api/v1/jobs", json=JOB, headers={**auth, "Idempotency-Key": "k\x00"})
    assert assert_refused(app, broker, response, ["Idempotency-Key: "])["param"] == "Idempotency-Key"


@pytest.mark.parametrize("query", ["/api/v1/jobs?cursor=%00", "/api/v1/jobs?status=%00", "/api/v1/batches?cursor=%00"])
def test_a_nul_in_a_query_parameter_is_a_400_naming_it(client, auth, query):
    """Query values reach the database too."""
    response = client.get(query, headers=auth)
    name = query.split("?")[1].split("=")[0]
    assert response.status_code == 400
    assert response.get_json()["error"]["message"].startswith(f"{name}: contains a NUL character")


# --- wrong types, blank text, content types -----------------------------------------


@pytest.mark.parametrize("path, body, field, words", [
    ("/api/v1/jobs", {**JOB, "prompt": 5}, "prompt", "valid string"),
    ("/api/v1/jobs", {"model": "tiny", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]},
     "messages.0.content", "valid string"),
    ("/api/v1/jobs", {**JOB, "model": 1}, "model", "valid string"),
    ("/api/v1/jobs", {**JOB, "metadata": {"k": 1}}, "metadata.k", "valid string"),
    ("/api/v1/jobs", {**JOB, "metadata": {"k" * 65: "v"}}, f"metadata: the key {'k' * 65!r}", "at most 64 characters"),
    ("/api/v1/jobs", {**JOB, "priority": 1}, "priority", "'interactive' or 'bulk'"),
    ("/api/v1/jobs", {**JOB, "params": "max_tokens=5"}, "params", "valid dictionary"),
    ("/api/v1/tribunals", {**TRIBUNAL, "candidates": "tiny"}, "candidates", "valid list"),
    ("/api/v1/tribunals", {**TRIBUNAL, "candidates": ["tiny", 2]}, "candidates.1", "valid string"),
    ("/api/v1/tribunals", {**TRIBUNAL, "bypass": True}, "bypass", "'auto', 'never' or 'always'"),
])
def test_values_of_the_wrong_type_are_not_coerced(app, client, auth, broker, spec, path, body, field, words):
    """No lax coercion: 1 is not "1", a list of parts is not a string."""
    response = client.post(path, json=body, headers=auth)
    error = assert_refused(app, broker, response, [f"{field}: ", words])
    assert_matches_openapi(spec, path, "post", response)
    assert error["code"] == "invalid_request"


@pytest.mark.parametrize("path, base", [("/api/v1/jobs", {"model": "tiny"}), ("/api/v1/tribunals", TRIBUNAL)])
@pytest.mark.parametrize("fields, field", [
    ({"prompt": " \n\t "}, "prompt"),
    ({"prompt": None, "messages": [{"role": "user", "content": ""}]}, "messages.0.content"),
    ({"prompt": None, "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "  "}]},
     "messages.1.content"),
])
def test_blank_prompts_and_chat_messages_are_a_400_naming_them(app, client, auth, broker, path, base, fields, field):
    """Text with nothing but white space is refused by name (a message's place in the list too)."""
    response = client.post(path, json={**base, **fields}, headers=auth)
    assert assert_refused(app, broker, response, [f"{field}: must not be blank"])["param"] == field


def test_a_blank_message_in_a_jsonl_file_fails_only_its_row(client, auth, broker):
    """In a file a blank message is a row's problem, named in that row's error; the others run."""
    blank = jsonl_line("b", messages=[{"role": "user", "content": "hi"}, {"role": "user", "content": " "}])
    batch = upload(client, auth, jsonl_line(prompt="fine") + "\n" + blank + "\n", filename="rows.jsonl").get_json()
    assert batch["request_counts"] == {"total": 2, "completed": 0, "failed": 1, "cancelled": 0}
    rows = client.get(f"/api/v1/batches/{batch['id']}/results?format=jsonl", headers=auth).get_data(as_text=True)
    assert json.loads(rows.splitlines()[1])["error"] == {
        "code": "empty_prompt", "message": "body.messages.1.content is empty"}


@pytest.mark.parametrize("part", [
    pytest.param({"type": "text", "text": 5}, id="number as text"),
    pytest.param({"type": "text"}, id="no text"),
    pytest.param("hi", id="bare string"),
    pytest.param({"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}, id="image"),
])
def test_a_message_part_that_is_not_text_refuses_the_jsonl_file_naming_it(app, client, auth, broker, part):
    """Content parts must be {type: text, text: "..."}; anything else is named, not silently dropped."""
    line = jsonl_line(messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}, part]}])
    response = upload(client, auth, line + "\n", filename="rows.jsonl")
    assert_refused(app, broker, response, ["line 1, column 'body.messages.0.content.1': only text parts are supported"])


@pytest.mark.parametrize("path", ["/api/v1/jobs", "/api/v1/tribunals"])
@pytest.mark.parametrize("content_type, named", [("text/plain", "'text/plain'"), ("", "missing"),
                                                 ("application/x-www-form-urlencoded", "'application/x-www-form")])
def test_json_sent_as_another_content_type_is_a_400_asking_for_json(app, client, auth, broker, spec, path,
                                                                     content_type, named):
    """A valid JSON body is still refused unless it is labelled application/json."""
    body = json.dumps(JOB if path.endswith("jobs") else TRIBUNAL)
    response = post_json(client, auth, path, body, content_type=content_type)
    error = assert_refused(app, broker, response, ["Content-Type: application/json", named])
    assert error["code"] == "invalid_content_type"
    assert_matches_openapi(spec, path, "post", response)


def test_a_batch_sent_as_json_is_a_400_asking_for_multipart(app, client, auth, broker):
    response = post_json(client, auth, "/api/v1/batches", json.dumps({"model": "tiny", "file": "prompt\nhi\n"}))
    assert assert_refused(app, broker, response, ["multipart/form-data"])["code"] == "invalid_content_type"


# --- CSV results --------------------------------------------------------------------


def test_results_quote_every_cell_holding_a_line_break(client, auth, broker):
    """A CR, LF or CRLF inside a cell is quoted, so a spreadsheet sees one record per row."""
    ids = ["cr\rid", "lf\nid", "crlf\r\nid", "plain"]
    source = io.StringIO()
    csv.writer(source).writerows([("id", "prompt"), *((i, "hi") for i in ids)])
    batch = upload(client, auth, source.getvalue()).get_json()
    text = client.get(f"/api/v1/batches/{batch['id']}/results", headers=auth).get_data(as_text=True)
    for custom_id in ids[:3]:
        assert f'"{custom_id}"' in text
    table = list(csv.reader(io.StringIO(text, newline="")))
    assert [record[0] for record in table] == ["id", *ids]


def test_csv_results_quote_line_breaks_in_text_and_errors():
    """The model's text and the error message are cells like any other."""
    row = SimpleNamespace(custom_id="1", status="failed", result_text="one\rtwo", finish_reason=None,
                          prompt_tokens=None, completion_tokens=None, error_code="x", error_message="a\nb")
    text = "".join(results.csv_pieces([row], "id"))
    assert text.endswith('"one\rtwo",,,,"x: a\nb"\r\n')
    assert len(list(csv.reader(io.StringIO(text, newline="")))) == 2


# --- routing ------------------------------------------------------------------------


@pytest.mark.parametrize("method, path, status", [
    ("GET", "/api/v1//jobs", 404),
    ("POST", "/api/v1//jobs", 404),
    ("GET", "//api/v1/jobs", 404),
    ("GET", "/api/v1/jobs/..", 404),
    ("GET", "/api/v1/jobs/%2e%2e/x", 404),
    ("GET", "/api/v1/jobs/a%2Fb", 404),
    ("GET", "/api/v1/jobs/%00", 404),
    ("POST", "/api/v1/batches/%00/cancel", 404),
    ("GET", "/api/v1/nothing-here", 404),
    ("GET", "/api/v1/jobs?limit=many", 400),
])
def test_odd_paths_answer_json_never_a_redirect(client, auth, method, path, status):
    """Doubled slashes, dot segments, encoded slashes and NULs in ids: a JSON 404 (or 400), no HTML."""
    response = client.open(path, method=method, headers=auth)
    assert response.status_code == status
    assert response.is_json and response.get_json()["error"]["message"]
    assert "Location" not in response.headers


@pytest.mark.parametrize("method, path, allowed", [
    ("DELETE", "/api/v1/jobs/job_x", "GET"),
    ("PUT", "/api/v1/jobs", "GET, POST"),
    ("GET", "/api/v1/tribunals", "POST"),
])
def test_a_wrong_method_is_a_405_with_allow(client, auth, method, path, allowed):
    """The 405 keeps werkzeug's Allow header and says which methods to use."""
    response = client.open(path, method=method, headers=auth)
    assert response.status_code == 405
    assert set(allowed.split(", ")) <= set(response.headers["Allow"].split(", "))
    error = response.get_json()["error"]
    assert error["code"] == "method_not_allowed" and f"{method} is not allowed" in error["message"]


# --- the database away --------------------------------------------------------------


def test_an_unreachable_database_is_a_503_logged_once_without_a_traceback(tmp_path, fake_broker, spec, caplog):
    """Connection refused is database_unavailable (503), one WARNING, not a 500 with a stack."""
    settings = load_settings(environ={}, data_dir=tmp_path, broker_url=fake_broker,
                             database_url=f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/x")
    client = create_app(settings).test_client()
    with caplog.at_level(logging.WARNING, logger="web.errors"):
        response = client.get("/api/v1/jobs/job_x", headers={"Authorization": "Bearer qe_anything"})
    assert response.status_code == 503
    error = assert_matches_openapi(spec, "/api/v1/jobs/{job_id}", "get", response)["error"]
    assert error["code"] == "database_unavailable"
    records = [r for r in caplog.records if r.name == "web.errors"]
    assert [(r.levelno, r.exc_info) for r in records] == [(logging.WARNING, None)]


# --- the OpenAPI document states what the server enforces ---------------------------


def request_schema(spec, path):
    schema = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
    return {**schema, "components": spec["components"]}


MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("path, body", [
    ("/api/v1/jobs", {"model": "tiny", "prompt": "hi"}),
    ("/api/v1/jobs", {"model": "tiny", "messages": MESSAGES}),
    ("/api/v1/jobs", {"model": "tiny", "prompt": None, "messages": MESSAGES}),
    ("/api/v1/jobs", {"model": "tiny"}),
    ("/api/v1/jobs", {"model": "tiny", "prompt": "hi", "messages": MESSAGES}),
    ("/api/v1/jobs", {"model": "tiny", "prompt": " "}),
    ("/api/v1/jobs", {"model": "tiny", "messages": [{"role": "user", "content": "\t"}]}),
    ("/api/v1/jobs", {"model": "tiny", "prompt": "hi", "params": {"seed": 2**63}}),
    ("/api/v1/jobs", {"model": "tiny", "prompt": "hi", "params": {"seed": 2**63 - 1}}),
    ("/api/v1/jobs", {"model": "tiny", "prompt": "hi", "params": {"stop": [""]}}),
    ("/api/v1/jobs", {"model": "tiny", "prompt": "hi", "params": {"max_tokens": "5"}}),
    ("/api/v1/jobs", {"model": "tiny", "prompt": "hi", "metadata": {"k" * 65: "v"}}),
    ("/api/v1/jobs", {"model": "tiny", "prompt": "hi", "webhook_url": "ftp://example.com/x"}),
    ("/api/v1/tribunals", TRIBUNAL),
    ("/api/v1/tribunals", {**TRIBUNAL, "prompt": None, "messages": MESSAGES}),
    ("/api/v1/tribunals", {**TRIBUNAL, "messages": MESSAGES}),
    ("/api/v1/tribunals", {"candidates": ["tiny"], "judge": "tiny"}),
    ("/api/v1/tribunals", {**TRIBUNAL, "candidates": []}),
])
def test_the_openapi_request_schemas_accept_exactly_what_the_server_accepts(client, auth, broker, spec, path, body):
    """A client generated from the document sends valid requests: its verdict matches the server's."""
    try:
        jsonschema.validate(body, request_schema(spec, path))
        documented = 202
    except jsonschema.ValidationError:
        documented = 400
    response = client.post(path, json=body, headers=auth)
    assert response.status_code == documented, response.get_json()
