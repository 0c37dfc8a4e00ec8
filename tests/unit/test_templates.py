"""CSV batches for research: prompt templates over columns, a system message,
per-row parameters from columns, the input's cells kept, and the dry run.

Each upload test runs on SQLite and PostgreSQL (``database_url``), over the
Flask test client with a fakeredis broker, as ``test_batches_api.py``.
"""

import json

import pytest
from click.testing import CliRunner
from sqlalchemy import func, select

from queue_engine.cli import main
from queue_engine.client import Client
from queue_engine.models import Batch, BatchChunk, Job
from queue_engine.templates import Template
from tests.helpers import assert_matches_openapi
from tests.unit.test_batches_api import BULK, csv_text, upload

PAPERS = csv_text(
    [("p1", "Fast MPI", "We scale MPI to 1M cores.", "32", "7"),
     ("p2", "Cats", "Cats sleep a lot.", "", "8"),
     ("p3", "GPU stencils", "", "16", "")],
    header=("id", "title", "abstract", "budget", "seed_col"))
TEMPLATE = "Title: {title}\nAbstract: {abstract}\nIs this paper about HPC? Answer yes or no."
SYSTEM = "You are a careful reviewer."


def stored_rows(app, batch_id):
    with app.extensions["qe_sessions"]() as session:
        return session.execute(
            select(Job.custom_id, Job.status, Job.prompt, Job.messages, Job.params, Job.cells, Job.error_code,
                   Job.error_message).where(Job.batch_id == batch_id).order_by(Job.row_index)).all()


def stored_batch(app, batch_id):
    with app.extensions["qe_sessions"]() as session:
        return session.execute(select(Batch.options, Batch.columns).where(Batch.id == batch_id)).one()


def counts(app, broker):
    """Batches, jobs, chunks stored, and messages on the broker."""
    with app.extensions["qe_sessions"]() as session:
        stored = tuple(session.scalar(select(func.count()).select_from(table)) for table in (Batch, Job, BatchChunk))
    return (*stored, broker.llen(BULK), broker.dbsize())


# --- the template itself (no database) ------------------------------------------


def test_template_fills_columns_and_keeps_literal_braces():
    """`{column}` takes the cell as it is; `{{`/`}}` are braces; a name is a column, whole."""
    template = Template.parse("{first name} -> {{json}} {score.v2} {first name}")
    assert template.columns == ("first name", "score.v2")
    assert template.fill({"first name": "Ada {x}", "score.v2": "9"}) == "Ada {x} -> {json} 9 Ada {x}"
    assert template.missing_columns(["first name"]) == ["score.v2"]


@pytest.mark.parametrize("text, words", [
    ("{a!r}", "conversion or a format spec"), ("{a:>3}", "conversion or a format spec"),
    ("{a", "expected '}'"), ("a}", "Single '}'"), ("{}", "empty placeholder"), ("no placeholders", "no {column}"),
])
def test_template_refuses_what_is_not_a_plain_placeholder(text, words):
    """Conversions, format specs, unbalanced braces, `{}` and a template without a column are refused."""
    with pytest.raises(ValueError, match="literal braces|placeholder") as raised:
        Template.parse(text)
    assert words in str(raised.value)


# --- uploads -------------------------------------------------------------------


def test_a_template_with_a_system_message_stores_each_row_as_chat_messages(make_app, auth_for, broker, spec):
    """Each row's messages are [system, user: the template filled from its cells]; the options are stored."""
    app = make_app()
    client, auth = app.test_client(), auth_for(app)
    response = upload(client, auth, PAPERS, template=TEMPLATE, system=SYSTEM, empty_cells="empty")
    assert response.status_code == 202, response.get_json()
    batch = assert_matches_openapi(spec, "/api/v1/batches", "post", response)
    rows = stored_rows(app, batch["id"])
    assert [r.custom_id for r in rows] == ["p1", "p2", "p3"]
    assert rows[0].prompt is None
    assert rows[0].messages == [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "Title: Fast MPI\nAbstract: We scale MPI to 1M cores.\n"
                                    "Is this paper about HPC? Answer yes or no."}]
    assert rows[2].messages[1]["content"] == "Title: GPU stencils\nAbstract: \nIs this paper about HPC? Answer yes or no."
    assert {r.status for r in rows} == {"queued"} and all(r.cells is None for r in rows)
    options, columns = stored_batch(app, batch["id"])
    assert options == {"template": TEMPLATE, "system": SYSTEM, "empty_cells": "empty"}
    assert columns is None


def test_a_template_without_a_system_message_stores_a_plain_prompt(make_app, auth_for, broker):
    """Without `system` the filled template is the row's prompt, as a prompt column's cell would be."""
    app = make_app()
    client, auth = app.test_client(), auth_for(app)
    data = "title;abstract\nA;{not a placeholder}\n"
    batch = upload(client, auth, data, template="[{title}] {{{abstract}}}").get_json()
    rows = stored_rows(app, batch["id"])
    assert [(r.custom_id, r.prompt, r.messages) for r in rows] == [("1", "[A] {{not a placeholder}}", None)]
    assert stored_batch(app, batch["id"]).options == {"template": "[{title}] {{{abstract}}}", "empty_cells": "fail"}


def test_an_empty_cell_fails_its_row_or_is_filled_empty_with_the_flag(make_app, auth_for, broker):
    """By default a row whose placeholder cell is empty fails (`empty_cell`, naming the column); the rest run."""
    app = make_app()
    client, auth = app.test_client(), auth_for(app)
    batch = upload(client, auth, PAPERS, template=TEMPLATE).get_json()
    assert batch["request_counts"] == {"total": 3, "completed": 0, "failed": 1, "cancelled": 0}
    failed = stored_rows(app, batch["id"])[2]
    assert (failed.custom_id, failed.status, failed.error_code) == ("p3", "failed", "empty_cell")
    assert "'abstract'" in failed.error_message
    filled = upload(client, auth, PAPERS, template=TEMPLATE, empty_cells="empty").get_json()
    assert filled["request_counts"]["failed"] == 0
    # A prompt that is nothing but empty cells is still an empty prompt.
    blank = upload(client, auth, "id,a\n1,\n2,x\n", template="{a}", empty_cells="empty").get_json()
    assert [r.error_code for r in stored_rows(app, blank["id"])] == ["empty_prompt", None]


def test_params_columns_set_each_rows_params_from_its_cells(make_app, auth_for, broker):
    """Valid cells become the row's params (an empty cell keeps the batch's); a bad cell fails its row, naming it."""
    app = make_app()
    client, auth = app.test_client(), auth_for(app)
    data = csv_text([("a", "x", "32", "7", "0.5"), ("b", "y", "", "", ""), ("c", "z", "lots", "1", ""),
                     ("d", "w", "0", "1", ""), ("e", "v", "9", "1", "3"), ("f", "u", "100000", "1", "")],
                    header=("id", "prompt", "budget", "seed_col", "temp"))
    response = upload(client, auth, data, params='{"max_tokens": 10, "temperature": 0}',
                      params_columns=json.dumps({"max_tokens": "budget", "seed": "seed_col", "temperature": "temp"}))
    assert response.status_code == 202, response.get_json()
    rows = {r.custom_id: r for r in stored_rows(app, response.get_json()["id"])}
    assert rows["a"].params == {"max_tokens": 32, "seed": 7, "temperature": 0.5}
    assert rows["b"].params == {} and rows["b"].status == "queued"
    assert (rows["c"].error_code, rows["c"].error_message) == (
        "invalid_param", "column 'budget' (max_tokens): 'lots' is not a whole number")
    assert rows["d"].error_code == "invalid_param"
    assert rows["d"].error_message.startswith("column 'budget' (max_tokens): Input should be greater than or equal")
    assert rows["e"].error_message.startswith("column 'temp' (temperature): Input should be less than or equal to 2")
    assert "above model 'tiny'" in rows["f"].error_message
    assert stored_batch(app, response.get_json()["id"]).options == {
        "params_columns": {"max_tokens": "budget", "seed": "seed_col", "temperature": "temp"}}


def test_keep_columns_stores_the_header_and_every_rows_cells(make_app, auth_for, broker):
    """`keep_columns=true` stores Batch.columns (the header, in order) and each row's cells."""
    app = make_app()
    client, auth = app.test_client(), auth_for(app)
    batch = upload(client, auth, PAPERS, template="{title}", keep_columns="true").get_json()
    options, columns = stored_batch(app, batch["id"])
    assert columns == ["id", "title", "abstract", "budget", "seed_col"]
    assert options == {"template": "{title}", "empty_cells": "fail", "keep_columns": True}
    rows = stored_rows(app, batch["id"])
    assert rows[1].cells == {"id": "p2", "title": "Cats", "abstract": "Cats sleep a lot.", "budget": "",
                             "seed_col": "8"}
    plain = upload(client, auth, csv_text([("1", "hi")]), keep_columns="false").get_json()
    assert stored_batch(app, plain["id"]) == (None, None)


JSONL = json.dumps({"custom_id": "q1", "body": {"prompt": "hi"}}) + "\n"

REFUSED = [
    pytest.param({"template": "{title} {authors}"}, "template", "'authors', which the header lacks", id="no column"),
    pytest.param({"template": "{title!r}"}, "template", "format spec", id="conversion"),
    pytest.param({"template": "{title:>3}"}, "template", "format spec", id="format spec"),
    pytest.param({"template": "{title"}, "template", "literal braces", id="unbalanced"),
    pytest.param({"template": "{title}", "prompt_column": "title"}, "template", "not both", id="with prompt_column"),
    pytest.param({"params_columns": '{"colour": "budget"}'}, "params_columns", "not a parameter", id="unknown param"),
    pytest.param({"params_columns": '{"seed": "nope"}'}, "params_columns", "'nope', which the header lacks",
                 id="unknown column"),
    pytest.param({"params_columns": "{seed: 1}"}, "params_columns", "not valid JSON", id="params_columns json"),
    pytest.param({"params_columns": '{"seed": 3}'}, "params_columns.seed", "string", id="params_columns value"),
    pytest.param({"keep_columns": "maybe"}, "keep_columns", "boolean", id="keep_columns word"),
    pytest.param({"template": "{title}", "empty_cells": "sometimes"}, "empty_cells", "'fail' or 'empty'",
                 id="empty_cells word"),
    pytest.param({"empty_cells": "empty"}, "empty_cells", "give a template", id="empty_cells alone"),
    pytest.param({"system": "   "}, "system", "blank", id="blank system"),
    pytest.param({"template": "{title}", "data": JSONL, "filename": "r.jsonl"}, "template", "only a CSV",
                 id="jsonl template"),
    pytest.param({"system": "Be brief.", "data": JSONL, "filename": "r.jsonl"}, "system", "only a CSV",
                 id="jsonl system"),
    pytest.param({"keep_columns": "true", "data": JSONL, "filename": "r.jsonl"}, "keep_columns", "only a CSV",
                 id="jsonl keep_columns"),
]


@pytest.mark.parametrize("dry_run", [False, True], ids=["upload", "dry run"])
@pytest.mark.parametrize("fields, param, words", REFUSED)
def test_a_bad_template_or_option_is_refused_naming_it_and_leaves_nothing(make_app, auth_for, broker, fields, param,
                                                                          words, dry_run):
    """Every bad template, placeholder, params_columns or option is a 400 naming the field; nothing is stored."""
    app = make_app()
    client, auth = app.test_client(), auth_for(app)
    fields = {"data": PAPERS, **fields}
    if dry_run:
        data, filename = fields.pop("data"), fields.pop("filename", "rows.csv")
        response = dry_run_upload(client, auth, data, filename, **fields)
    else:
        response = upload(client, auth, **fields)
    assert response.status_code == 400, response.get_json()
    error = response.get_json()["error"]
    assert error["param"] == param and words in error["message"], error
    assert counts(app, broker)[:4] == (0, 0, 0, 0)


def test_a_missing_placeholder_lists_the_columns(client, auth, broker):
    """The refusal of a placeholder naming no column lists the header's columns."""
    error = upload(client, auth, PAPERS, template="{titel}").get_json()["error"]
    assert error["message"] == ("line 1: the template names 'titel', which the header lacks "
                                "(the columns are: 'id', 'title', 'abstract', 'budget', 'seed_col')")


# --- dry run -------------------------------------------------------------------


def dry_run_upload(client, auth, data, filename="rows.csv", **fields):
    import io

    form = {"model": "tiny", **fields, "file": (io.BytesIO(data.encode()), filename)}
    return client.post("/api/v1/batches?dry_run=true", data=form, headers=auth, content_type="multipart/form-data")


@pytest.fixture(scope="module")
def built_tiny_model():
    """The tiny model's directory, built once per machine as the integration tests build it."""
    from tests.integration.conftest import MODEL_CACHE
    from workers.engine import resolve_model_dir

    return resolve_model_dir("tiny", MODEL_CACHE, log=print)


def test_a_dry_run_stores_nothing_and_shows_the_filled_rows_and_their_tokens(make_app, auth_for, broker, spec,
                                                                            tmp_path, built_tiny_model):
    """Nothing is stored or sent; the answer counts rows, counts tokens with the model's tokenizer, shows rows."""
    from transformers import AutoTokenizer

    app = make_app()
    # Where a worker of this data_dir would have built the built-in model.
    (tmp_path / "models").mkdir(exist_ok=True)
    (tmp_path / "models" / built_tiny_model.name).symlink_to(built_tiny_model)
    client, auth = app.test_client(), auth_for(app)
    upload(client, auth, csv_text([("1", "already here")]))
    before = counts(app, broker)
    response = dry_run_upload(client, auth, PAPERS, template=TEMPLATE, system=SYSTEM, keep_columns="true",
                              params_columns='{"max_tokens": "budget"}')
    assert response.status_code == 200, response.get_json()
    preview = assert_matches_openapi(spec, "/api/v1/batches", "post", response)
    assert counts(app, broker) == before
    assert (preview["dry_run"], preview["model"], preview["format"]) == (True, "tiny", "csv")
    assert (preview["rows"], preview["runnable_rows"], preview["failed_rows"]) == (3, 2, 1)
    assert preview["row_errors"] == [{"line": 4, "id": "p3", "code": "empty_cell",
                                      "message": preview["row_errors"][0]["message"]}]
    assert "'abstract'" in preview["row_errors"][0]["message"]
    assert preview["columns"] == ["id", "title", "abstract", "budget", "seed_col"]
    first = preview["first_rows"][0]
    assert first["id"] == "p1" and first["prompt"] is None and first["params"] == {"max_tokens": 32}
    assert first["messages"][1]["content"].startswith("Title: Fast MPI\nAbstract: We scale MPI")
    assert preview["first_rows"][2]["error"]["code"] == "empty_cell"
    # Counted as the worker runs it: the chat template applied, then tokenized.
    tokenizer = AutoTokenizer.from_pretrained(str(built_tiny_model))
    expected = sum(len(tokenizer(tokenizer.apply_chat_template(row["messages"], tokenize=False,
                                                               add_generation_prompt=True))["input_ids"])
                   for row in preview["first_rows"][:2])
    assert (preview["prompt_tokens"], preview["tokens_counted_with"], preview["tokenizer_error"]) == (
        expected, "tokenizer", None)


def test_a_dry_run_without_the_tokenizer_estimates_and_says_why(client, auth, broker):
    """A model whose tokenizer cannot be loaded is estimated at 4 characters a token, with the reason."""
    preview = dry_run_upload(client, auth, csv_text([("1", "x" * 40), ("2", "y" * 8)])).get_json()
    assert (preview["prompt_tokens"], preview["tokens_counted_with"]) == (12, "estimate")
    assert "not built on this machine" in preview["tokenizer_error"]
    assert [row["prompt"] for row in preview["first_rows"]] == ["x" * 40, "y" * 8]
    assert counts_are_zero(client.application, broker)


def counts_are_zero(app, broker):
    return counts(app, broker)[:4] == (0, 0, 0, 0)


# --- the CLI -------------------------------------------------------------------


class RecordingClient(Client):
    """A Client that records its calls and answers as a server would, without one."""

    calls = []

    def _call(self, method, path, stream=False, **kwargs):
        files = kwargs.pop("files", None)
        self.calls.append((method, path, kwargs, files["file"][1].read() if files else None))
        if kwargs.get("params", {}).get("dry_run") == "true":
            return {"dry_run": True, "model": "tiny", "format": "csv", "rows": 2, "runnable_rows": 1,
                    "failed_rows": 1, "prompt_tokens": 21, "tokens_counted_with": "tokenizer",
                    "tokenizer_error": None, "planned_tokens": 300, "columns": ["id", "title"], "options": {},
                    "row_errors": [{"line": 3, "id": "b", "code": "empty_cell", "message": "the cell is empty"}],
                    "first_rows": [{"id": "a", "prompt": None, "params": {"max_tokens": 5}, "error": None,
                                    "messages": [{"role": "system", "content": "Be brief."},
                                                 {"role": "user", "content": "Title: X"}]}]}
        return {"id": "batch_1", "request_counts": {"total": 2, "completed": 0, "failed": 0, "cancelled": 0}}


@pytest.fixture
def recording(monkeypatch):
    RecordingClient.calls = []
    monkeypatch.setattr("queue_engine.client.Client", RecordingClient)
    return RecordingClient.calls


def test_submit_passes_the_template_options_as_form_fields(tmp_path, recording):
    """`submit --template --system --params-columns --empty-cells --keep-columns` sends each as its form field."""
    source = tmp_path / "rows.csv"
    source.write_text("id,title\na,X\n")
    result = CliRunner().invoke(main, [
        "submit", str(source), "--key", "k", "--template", "Title: {title}", "--system", "Be brief.",
        "--params-columns", '{"max_tokens": "budget"}', "--empty-cells", "empty", "--keep-columns"], env={})
    assert result.exit_code == 0, result.output
    assert result.output.strip() == "batch_1"
    (method, path, kwargs, sent), = recording
    assert (method, path, sent) == ("POST", "/api/v1/batches", b"id,title\na,X\n")
    assert "params" not in kwargs
    assert kwargs["data"] == {"model": "tiny", "template": "Title: {title}", "system": "Be brief.",
                              "params_columns": '{"max_tokens": "budget"}', "empty_cells": "empty",
                              "keep_columns": "true"}


def test_submit_dry_run_prints_the_counts_tokens_and_first_rows(tmp_path, recording):
    """`submit --dry-run` asks for ?dry_run=true and prints the answer for reading."""
    source = tmp_path / "rows.csv"
    source.write_text("id,title\na,X\nb,\n")
    result = CliRunner().invoke(main, ["submit", str(source), "--key", "k", "--template", "Title: {title}",
                                       "--system", "Be brief.", "--dry-run"], env={})
    assert result.exit_code == 0, result.output
    assert recording[0][2]["params"] == {"dry_run": "true"}
    assert "rows: 2 (1 would run, 1 would fail)" in result.output
    assert "prompt tokens: 21 (counted with the model's tokenizer)" in result.output
    assert "line 3, id 'b': empty_cell: the cell is empty" in result.output
    assert "[system] Be brief.\n[user] Title: X" in result.output


@pytest.mark.parametrize("args, words", [
    (["--prompt", "hi", "--template", "{a}"], "--template describe a FILE batch"),
    (["FILE", "--params-columns", "{nope"], "--params-columns"),
])
def test_submit_refuses_file_options_without_a_file_or_bad_json(tmp_path, recording, args, words):
    """Template options need a FILE; --params-columns must be JSON; nothing is sent."""
    source = tmp_path / "rows.csv"
    source.write_text("a\nx\n")
    args = [str(source) if arg == "FILE" else arg for arg in args]
    result = CliRunner().invoke(main, ["submit", *args, "--key", "k"], env={})
    assert result.exit_code == 2 and words in result.output
    assert recording == []
