"""Structured answers at finish and as result columns: a batch's rows are
played through the run protocol (``leases``) as a worker plays them, then its
results read as CSV, JSONL and xlsx. On SQLite and PostgreSQL."""

import csv
import io
import json
from typing import NamedTuple

import openpyxl
import pytest
from sqlalchemy import select, update

from queue_engine import leases
from queue_engine.db import transaction
from queue_engine.models import Batch, Job
from queue_engine.schemas import BatchCreate
from tests.work import send_chunks

SCHEMA = {"type": "object", "properties": {"label": {"enum": ["pos", "neg"]}, "tags": {"type": "array"},
                                           "score": {"type": "integer"}}, "required": ["label"]}


class Generated(NamedTuple):
    text: str
    finish_reason: str = "stop"
    prompt_tokens: int = 2
    completion_tokens: int = 3
    output: dict | None = None


def upload(client, auth, prompts, params, header="id,prompt", rows=None):
    rows = rows or [f"r{i},{prompt}" for i, prompt in enumerate(prompts, start=1)]
    data = (header + "\n" + "\n".join(rows) + "\n").encode()
    form = {"model": "tiny", "params": json.dumps(params), "file": (io.BytesIO(data), "rows.csv")}
    response = client.post("/api/v1/batches", data=form, headers=auth, content_type="multipart/form-data")
    assert response.status_code == 202, response.get_json()
    return response.get_json()["id"]


def run_rows(app, batch_id, generations):
    """Claim the batch's rows as worker w1 and finish them with ``generations``, in row order."""
    sessions, settings = app.extensions["qe_sessions"], app.extensions["qe_settings"]
    with transaction(sessions) as session:
        send_chunks(session, settings)
    with transaction(sessions) as session:
        items = leases.claim(session, "w1", 30, chunks=[(batch_id, 0)])
    with sessions() as session:
        order = session.execute(select(Job.id).where(Job.batch_id == batch_id).order_by(Job.row_index)).scalars()
        by_id = {item.id: item for item in items}
        items = [by_id[job_id] for job_id in order]
    with transaction(sessions) as session:
        leases.finish(session, "w1", [leases.Outcome(item, generation) for item, generation in zip(items, generations)],
                      settings)


def set_batch(app, batch_id, **values):
    with transaction(app.extensions["qe_sessions"]) as session:
        session.execute(update(Batch).where(Batch.id == batch_id).values(**values))


def rows_of(app, batch_id):
    with app.extensions["qe_sessions"]() as session:
        return session.execute(select(Job).where(Job.batch_id == batch_id).order_by(Job.row_index)).scalars().all()


def results(client, auth, batch_id, file_format="csv"):
    response = client.get(f"/api/v1/batches/{batch_id}/results?format={file_format}", headers=auth)
    assert response.status_code == 200, response.get_data(as_text=True)
    return response


def csv_table(client, auth, batch_id):
    return list(csv.reader(io.StringIO(results(client, auth, batch_id).get_data(as_text=True), newline="")))


def test_finish_stores_the_parsed_answer_and_fails_an_invalid_one(app, client, auth):
    """A valid answer is parsed into output["parsed"]; one cut short fails invalid_answer, keeping its text."""
    batch_id = upload(client, auth, ["a", "b"], {"response_format": {"type": "json_schema", "schema": SCHEMA}})
    run_rows(app, batch_id, [Generated('{"label":"pos","tags":["x",1],"score":4}'),
                             Generated('{"label":"p', finish_reason="length")])
    good, cut = rows_of(app, batch_id)
    assert good.status == "succeeded" and good.output == {"parsed": {"label": "pos", "tags": ["x", 1], "score": 4}}
    assert cut.status == "failed" and cut.error_code == "invalid_answer" and "not JSON" in cut.error_message
    assert cut.result_text == '{"label":"p' and cut.completion_tokens == 3
    batch = client.get(f"/api/v1/batches/{batch_id}", headers=auth).get_json()
    assert batch["status"] == "completed" and batch["request_counts"]["completed"] == 1
    assert batch["request_counts"]["failed"] == 1


def test_csv_results_have_a_column_per_property_and_the_row_error(app, client, auth):
    """Top-level properties in the schema's order beside text; arrays as compact JSON; the failed row's error."""
    batch_id = upload(client, auth, ["a", "b"], {"response_format": {"type": "json_schema", "schema": SCHEMA}})
    run_rows(app, batch_id, [Generated('{"label":"pos","tags":["x",1],"score":4}'), Generated('{"label":"meh"}')])
    table = csv_table(client, auth, batch_id)
    assert table[0] == ["id", "status", "text", "label", "tags", "score", "finish_reason", "prompt_tokens",
                        "completion_tokens", "error"]
    assert table[1][:6] == ["r1", "succeeded", '{"label":"pos","tags":["x",1],"score":4}', "pos", '["x",1]', "4"]
    assert table[2][1] == "failed" and table[2][3:6] == ["", "", ""]
    assert table[2][-1].startswith("invalid_answer: the answer does not follow the schema")
    items = [json.loads(line) for line in results(client, auth, batch_id, "jsonl").get_data(as_text=True).splitlines()]
    assert items[0]["parsed"] == {"label": "pos", "tags": ["x", 1], "score": 4} and items[1]["parsed"] is None


@pytest.mark.parametrize("response_format, answers, expected", [
    ({"type": "choice", "choices": ["yes", "no"]}, ["yes", "nope"], ["yes", ""]),
    ({"type": "regex", "pattern": "[0-9]+"}, ["42", "4x2"], ["42", ""]),
])
def test_choice_and_regex_results_have_an_answer_column(app, client, auth, response_format, answers, expected):
    """A choice or regex answer goes in the answer column; an answer outside it fails invalid_answer."""
    batch_id = upload(client, auth, ["a", "b"], {"response_format": response_format})
    run_rows(app, batch_id, [Generated(text) for text in answers])
    table = csv_table(client, auth, batch_id)
    assert table[0][:4] == ["id", "status", "text", "answer"]
    assert [record[3] for record in table[1:]] == expected
    assert [record[1] for record in table[1:]] == ["succeeded", "failed"]
    assert table[2][-1].startswith("invalid_answer: the answer 'nope'" if answers[1] == "nope"
                                   else "invalid_answer: the answer '4x2' does not match")


def samples(*texts):
    return {"choices": [{"text": text, "finish_reason": "stop", "logprobs": None} for text in texts]}


def test_n_samples_are_each_checked_and_one_line_each(app, client, auth):
    """n=2: each sample parsed; a row with one invalid sample fails, keeping the valid one's columns."""
    params = {"n": 2, "response_format": {"type": "choice", "choices": ["yes", "no"]}}
    batch_id = upload(client, auth, ["a", "b"], params)
    run_rows(app, batch_id, [Generated("yes", output=samples("yes", "no")),
                             Generated("no", output=samples("no", "bad"))])
    whole, partial = rows_of(app, batch_id)
    assert whole.status == "succeeded" and whole.output["parsed"] == ["yes", "no"]
    assert partial.status == "failed" and partial.error_code == "invalid_answer"
    assert partial.error_message.startswith("1 of 2 samples invalid: sample 1:")
    table = csv_table(client, auth, batch_id)
    assert table[0][:5] == ["id", "sample", "status", "text", "answer"]
    assert [record[:5] for record in table[1:]] == [
        ["r1", "0", "succeeded", "yes", "yes"], ["r1", "1", "succeeded", "no", "no"],
        ["r2", "0", "failed", "no", "no"], ["r2", "1", "failed", "bad", ""]]
    assert [record[-3:-1] for record in table[1:]] == [["2", "3"], ["", ""], ["2", "3"], ["", ""]]
    assert table[3][-1] == "" and table[4][-1].startswith("invalid_answer: the answer 'bad'")


def test_n_samples_side_by_side_with_samples_columns(app, client, auth):
    """samples=columns: text_0, label_0, ..., text_1, label_1, ... on one line per row."""
    schema = {"type": "object", "properties": {"label": {"enum": ["pos", "neg"]}}}
    batch_id = upload(client, auth, ["a"], {"n": 2, "response_format": {"type": "json_schema", "schema": schema}})
    set_batch(app, batch_id, options={"samples": "columns"})
    run_rows(app, batch_id, [Generated('{"label":"pos"}', output=samples('{"label":"pos"}', '{"label":"neg"}'))])
    table = csv_table(client, auth, batch_id)
    assert table[0] == ["id", "status", "text_0", "label_0", "text_1", "label_1", "finish_reason", "prompt_tokens",
                        "completion_tokens", "error"]
    assert table[1] == ["r1", "succeeded", '{"label":"pos"}', "pos", '{"label":"neg"}', "neg", "stop", "2", "3", ""]


def test_the_samples_form_field_is_rows_or_columns():
    """BatchCreate takes samples: rows or columns, nothing else."""
    assert BatchCreate.model_validate({"model": "tiny", "samples": "columns"}).samples == "columns"
    with pytest.raises(ValueError, match="samples"):
        BatchCreate.model_validate({"model": "tiny", "samples": "wide"})


def test_kept_input_columns_come_first_and_clashes_get_a_prefix(app, client, auth):
    """keep_columns: the input's columns first, the id once in its place; 'text' and 'label' become input_*."""
    batch_id = upload(client, auth, [], {"response_format": {"type": "json_schema", "schema": SCHEMA}},
                      header="id,prompt,text,label", rows=["r1,hello,some text,gold"])
    set_batch(app, batch_id, columns=["id", "prompt", "text", "label"])
    with transaction(app.extensions["qe_sessions"]) as session:
        session.execute(update(Job).where(Job.batch_id == batch_id).values(
            cells={"id": "r1", "prompt": "hello", "text": "=some text", "label": "gold"}))
    run_rows(app, batch_id, [Generated('{"label":"neg"}')])
    table = csv_table(client, auth, batch_id)
    assert table[0][:7] == ["id", "prompt", "input_text", "input_label", "status", "text", "label"]
    assert table[1][:7] == ["r1", "hello", "'=some text", "gold", "succeeded", '{"label":"neg"}', "neg"]
    items = [json.loads(line) for line in results(client, auth, batch_id, "jsonl").get_data(as_text=True).splitlines()]
    assert list(items[0])[:5] == ["id", "prompt", "input_text", "input_label", "custom_id"]
    assert items[0]["input_text"] == "=some text" and items[0]["text"] == '{"label":"neg"}'


def test_xlsx_results_hold_the_csv_cells_as_strings_never_formulas(app, client, auth):
    """The xlsx sheet has the CSV's header and cells (unescaped), and a text starting with '=' stays text."""
    batch_id = upload(client, auth, ["a", "b"], {"response_format": {"type": "choice", "choices": ["=1+1", "no"]}})
    run_rows(app, batch_id, [Generated("=1+1"), Generated("maybe")])
    response = results(client, auth, batch_id, "xlsx")
    assert response.content_type.startswith("application/vnd.openxmlformats-officedocument.spreadsheetml.sheet")
    assert 'filename="' in response.headers["Content-Disposition"] and ".xlsx" in response.headers["Content-Disposition"]
    sheet = openpyxl.load_workbook(io.BytesIO(response.get_data())).active
    cells = [["" if cell.value is None else str(cell.value) for cell in row] for row in sheet.iter_rows()]
    table = csv_table(client, auth, batch_id)
    unescaped = [[value[1:] if value.startswith("'=") else value for value in record] for record in table]
    assert cells == unescaped
    assert sheet["C2"].value == "=1+1" and sheet["C2"].data_type == "s" and sheet["D2"].data_type == "s"


def test_an_unknown_results_format_is_refused(client, auth):
    """format= must be csv, jsonl or xlsx."""
    batch_id = upload(client, auth, ["a"], {})
    response = client.get(f"/api/v1/batches/{batch_id}/results?format=ods", headers=auth)
    assert response.status_code == 400 and "xlsx" in response.get_json()["error"]["message"]
