"""Structured answers with a real worker on the tiny model: a json_schema
batch whose results have a column per property (a row cut by a tiny
max_tokens fails invalid_answer), and a choice batch, read back through the
CLI as CSV and xlsx."""

import csv
import io
import json

import openpyxl
import pytest
from click.testing import CliRunner

from queue_engine.cli import main
from queue_engine.client import Client
from tests.conftest import make_key
from tests.integration.conftest import Cluster

pytestmark = pytest.mark.integration

SCHEMA = {"type": "object", "properties": {"mood": {"enum": ["happy", "sad"]}, "size": {"enum": ["small", "big"]}},
          "required": ["mood", "size"], "additionalProperties": False}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_model_dir, redis_server, cluster_database_url):
    cluster = Cluster(tmp_path_factory.mktemp("structured"), tiny_model_dir, redis_server.url, cluster_database_url)
    cluster.start_worker()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def key(cluster):
    return make_key(cluster.sessions, "researcher")[0].key


@pytest.fixture
def client(cluster, key):
    return Client(cluster.url, key)


def line(custom_id, prompt, **body):
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/completions",
                       "body": {"model": "tiny", "prompt": prompt, **body}})


def test_a_schema_batch_gets_property_columns_and_a_cut_answer_fails(cluster, client, key, tmp_path):
    """Enum-only properties fill their columns; the row with max_tokens 3 is cut short: invalid_answer."""
    data = "\n".join([line("a", "Describe a cat."), line("b", "Describe a dog."), line("cut", "Hi", max_tokens=3)])
    params = {"max_tokens": 64, "temperature": 0, "response_format": {"type": "json_schema", "schema": SCHEMA}}
    batch = client.submit_batch(io.BytesIO(data.encode()), "tiny", filename="rows.jsonl", params=params)
    done = client.wait_for_batch(batch["id"], timeout=300)
    assert done["status"] == "completed" and done["request_counts"] == {
        "total": 3, "completed": 2, "failed": 1, "cancelled": 0}
    out = tmp_path / "out.csv"
    result = CliRunner().invoke(main, ["results", batch["id"], "-o", str(out), "--url", cluster.url,
                                       "--key", key])
    assert result.exit_code == 0, result.output
    table = list(csv.DictReader(out.open(newline="", encoding="utf-8")))
    assert list(table[0])[1:5] == ["status", "text", "mood", "size"]
    for row in table[:2]:
        assert row["status"] == "succeeded" and row["mood"] in ("happy", "sad") and row["size"] in ("small", "big")
        assert json.loads(row["text"]) == {"mood": row["mood"], "size": row["size"]}
    assert table[2]["status"] == "failed" and table[2]["error"].startswith("invalid_answer: the answer is not JSON")
    assert table[2]["text"] and table[2]["mood"] == ""


def test_a_choice_batch_from_the_cli_gets_an_answer_column_in_xlsx(cluster, client, key, tmp_path):
    """submit --choices runs each row constrained to a choice; results -o out.xlsx picks xlsx."""
    source = tmp_path / "rows.csv"
    source.write_text("id,prompt\n1,Is the sky blue?\n2,Is fire cold?\n")
    runner = CliRunner()
    submitted = runner.invoke(main, ["submit", str(source), "--choices", "yes,no", "--max-tokens", "8",
                                     "--url", cluster.url, "--key", key])
    assert submitted.exit_code == 0, submitted.output
    batch_id = submitted.output.splitlines()[0].strip()
    assert client.wait_for_batch(batch_id, timeout=300)["request_counts"]["completed"] == 2
    out = tmp_path / "out.xlsx"
    result = runner.invoke(main, ["results", batch_id, "-o", str(out), "--url", cluster.url, "--key", key])
    assert result.exit_code == 0, result.output
    rows = list(openpyxl.load_workbook(out).active.iter_rows(values_only=True))
    assert rows[0][:4] == ("id", "status", "text", "answer")
    assert [row[3] for row in rows[1:]] == [row[2] for row in rows[1:]]
    assert all(row[3] in ("yes", "no") for row in rows[1:])
