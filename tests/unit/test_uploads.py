"""Reading batch files: which problems refuse the file (and where they are
reported), which fail one row, and what a good file yields."""

import io
import json

import pytest

from queue_engine.errors import InvalidFileError
from queue_engine.uploads import Upload, detect_format, read_rows

UPLOAD = Upload(model="tiny", max_rows=1000, max_prompt_chars=50, max_tokens_limit=512,
                batch_params={"max_tokens": 16, "temperature": 1.0, "top_p": 1.0, "stop": None, "seed": None})


def rows_of(data, file_format="csv", **changes):
    upload = Upload(**{**UPLOAD.__dict__, **changes})
    data = data.encode() if isinstance(data, str) else data
    reader = read_rows(io.BytesIO(data), file_format, upload)
    return list(reader), reader


def refused(data, file_format="csv", **changes):
    with pytest.raises(InvalidFileError) as caught:
        rows_of(data, file_format, **changes)
    return caught.value


# --- CSV ---------------------------------------------------------------------------


def test_a_csv_yields_rows_in_order_with_their_ids_and_lines():
    rows, reader = rows_of('id,prompt\na,hello\nb,"two\nlines"\nc,bye\n')
    assert [(r.index, r.custom_id, r.prompt, r.line) for r in rows] == [
        (0, "a", "hello", 2), (1, "b", "two\nlines", 4), (2, "c", "bye", 5)]
    assert reader.id_header == "id"
    assert all(r.error is None for r in rows)


def test_a_byte_order_mark_and_crlf_line_ends_are_fine():
    rows, _ = rows_of(b"\xef\xbb\xbfid,prompt\r\n1,hi\r\n")
    assert [(r.custom_id, r.prompt) for r in rows] == [("1", "hi")]


@pytest.mark.parametrize("delimiter", [";", "\t", "|"])
def test_the_delimiter_is_sniffed_from_the_header(delimiter):
    rows, _ = rows_of(f"id{delimiter}prompt\n1{delimiter}a, b and c\n")
    assert rows[0].prompt == "a, b and c"


def test_a_given_delimiter_wins():
    rows, _ = rows_of("id;prompt\n1;x\n", delimiter=";")
    assert rows[0].prompt == "x"


def test_without_an_id_column_rows_are_numbered_from_one():
    rows, reader = rows_of("prompt\nx\ny\n")
    assert [r.custom_id for r in rows] == ["1", "2"]
    assert reader.id_header == "row"


def test_other_column_names_can_be_chosen():
    rows, reader = rows_of("key,question\nk1,why?\n", prompt_column="question", id_column="key", id_column_given=True)
    assert (rows[0].custom_id, rows[0].prompt, reader.id_header) == ("k1", "why?", "key")


def test_an_empty_or_too_long_prompt_fails_only_its_row():
    rows, _ = rows_of(f"id,prompt\n1,ok\n2,   \n3,{'x' * 51}\n")
    assert rows[0].error is None
    assert rows[1].error[0] == "empty_prompt"
    assert rows[2].error == ("prompt_too_long", "the prompt has 51 characters; the limit is 50")


@pytest.mark.parametrize("data, line, words", [
    ("", 1, "empty"),
    ("id,text\n1,x\n", 1, "no column 'prompt'"),
    ("id,prompt\n", 1, "no rows"),
    ('id,prompt\n1,ok\n2,"broken"quote\n', 3, "quoting"),
    ('id,prompt\n1,"never closed\n2,x\n', 2, "quoting"),
    ("id,prompt\n1,a,extra\n", 2, "3 fields where the header has 2"),
    ("id,prompt\n1,a\n1,b\n", 3, "duplicate id '1'"),
    ("id,prompt\n1,a\n ,b\n", 3, "id is empty"),
])
def test_problems_with_a_csv_file_refuse_it_naming_the_line(data, line, words):
    error = refused(data)
    assert error.line == line
    assert words in str(error)
    assert str(error).startswith(f"line {line}")


def test_a_file_that_is_not_utf8_is_refused_at_the_bad_line():
    error = refused("id,prompt\n1,fine\n2,caf".encode() + b"\xe9\n3,x\n")
    assert error.line == 3
    assert "not UTF-8" in str(error)


def test_a_missing_id_column_that_was_asked_for_is_refused():
    error = refused("prompt\nx\n", id_column="key", id_column_given=True)
    assert "no column 'key'" in str(error)


def test_more_rows_than_the_limit_is_refused():
    error = refused("prompt\na\nb\nc\n", max_rows=2)
    assert error.line == 4
    assert "more than 2 rows" in str(error)


def test_binary_files_are_recognised_as_such():
    with pytest.raises(InvalidFileError, match="binary"):
        detect_format("upload", b"PK\x03\x04\x00\x00")


@pytest.mark.parametrize("name, head, expected", [
    ("a.csv", b"{", "csv"), ("a.jsonl", b"id", "jsonl"), (None, b'\n {"custom_id"', "jsonl"), (None, b"id,prompt", "csv"),
])
def test_the_format_comes_from_the_name_else_the_content(name, head, expected):
    assert detect_format(name, head) == expected


# --- JSONL ---------------------------------------------------------------------------


def line(custom_id, **body):
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body})


def test_openai_batch_lines_yield_chat_rows_and_prompt_rows():
    data = "\n".join([
        line("a", model="tiny", messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]),
        "",
        line("b", prompt="once upon", max_tokens=4, temperature=0),
        line("c", messages=[{"role": "user", "content": [{"type": "text", "text": "parts"}]}]),
    ])
    rows, reader = rows_of(data, "jsonl")
    assert reader.id_header == "custom_id"
    assert [r.custom_id for r in rows] == ["a", "b", "c"]
    assert rows[0].messages == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert rows[0].params == {}
    assert (rows[1].prompt, rows[1].params, rows[1].line) == ("once upon", {"max_tokens": 4, "temperature": 0.0}, 3)
    assert rows[2].messages == [{"role": "user", "content": "parts"}]


def test_an_empty_message_fails_only_its_row():
    rows, _ = rows_of(line("a", messages=[{"role": "user", "content": ""}]), "jsonl")
    assert rows[0].error[0] == "empty_prompt"


@pytest.mark.parametrize("text, column, words", [
    ('{"custom_id": "a", "body": ', None, "not valid JSON"),
    ('["a"]', None, "JSON object"),
    ('{"body": {"prompt": "x"}}', "custom_id", "custom_id is missing"),
    ('{"custom_id": "a"}', "body", "body is missing"),
    ('{"custom_id": "a", "body": {}}', "body", "messages"),
    ('{"custom_id": "a", "url": "/v1/embeddings", "body": {"prompt": "x"}}', "url", "not supported"),
    ('{"custom_id": "a", "body": {"prompt": "x", "logit_bias": {}}}', "body.logit_bias", "not a supported parameter"),
    ('{"custom_id": "a", "body": {"prompt": "x", "temperature": 9}}', "body.temperature", "less than or equal to 2"),
    ('{"custom_id": "a", "body": {"prompt": "x", "max_tokens": 9999}}', "body.max_tokens", "limit of 512"),
    ('{"custom_id": "a", "body": {"prompt": "x", "model": "other"}}', "body.model", "one model"),
    ('{"custom_id": "a", "body": {"messages": [{"role": "robot", "content": "x"}]}}', "body.messages.0.role", "role"),
])
def test_problems_with_a_jsonl_line_refuse_the_file_naming_line_and_field(text, column, words):
    error = refused(line("ok", prompt="fine") + "\n" + text + "\n", "jsonl")
    assert (error.line, error.column) == (2, column)
    assert words in str(error)


def test_duplicate_custom_ids_are_refused():
    error = refused(line("a", prompt="x") + "\n" + line("a", prompt="y"), "jsonl")
    assert (error.line, error.column) == (2, "custom_id")
