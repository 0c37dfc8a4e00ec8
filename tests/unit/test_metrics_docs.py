"""The metrics as documented: the README's table against the catalogue
(``queue_engine.metrics.CATALOGUE``), and the two files in ``monitoring/``:
the scrape config and the Grafana dashboard, whose every query is PromQL
``promtool`` accepts and names only catalogued metrics."""

import json
import re
import shutil
import subprocess

import pytest
import yaml

from queue_engine import metrics
from queue_engine.metrics import CATALOGUE
from tests.helpers import ROOT

TABLE_HEADER = "| metric | type | labels | exposed by | meaning |"
DASHBOARD = ROOT / "monitoring" / "grafana-dashboard.json"
SCRAPE_CONFIG = ROOT / "monitoring" / "prometheus.yml"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (Debian's prometheus package)")


def readme_table():
    """``{name: (type, labels, exposed by)}`` from the README's metrics table."""
    lines = (ROOT / "README.md").read_text().splitlines()
    start = lines.index(TABLE_HEADER) + 2  # past the header and its |---| line
    table = {}
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        name, kind, labels, exposed_by, meaning = [cell.strip() for cell in line.strip("|").split(" | ")]
        assert meaning, f"{name}: no meaning given"
        table[name.strip("`")] = (kind, tuple(labels.split(", ")), tuple(exposed_by.split(", ")))
    return table


def dashboard_queries():
    return [target["expr"] for panel in json.loads(DASHBOARD.read_text())["panels"] for target in panel["targets"]]


def metric_names(expression):
    """The qe_ metrics an expression reads, with histogram suffixes taken off."""
    return {re.sub(r"_(bucket|sum|count)$", "", name) for name in re.findall(r"\bqe_[a-z_]+\b", expression)}


def test_the_readme_documents_every_metric_with_its_type_labels_and_processes():
    """Every row of the README's table is a catalogued metric as defined, and every catalogued metric has a row."""
    documented = readme_table()
    catalogued = {m.name: (m.type, m.labels, m.exposed_by) for m in CATALOGUE}
    assert sorted(documented) == sorted(catalogued)
    for name, definition in catalogued.items():
        assert documented[name] == definition, name


def test_the_readme_gives_the_ports_the_scrape_config_uses():
    """The worker's and autoscaler's conventional ports are the ones in the README and in prometheus.yml."""
    readme, config = (ROOT / "README.md").read_text(), SCRAPE_CONFIG.read_text()
    for port in (metrics.WORKER_PORT, metrics.AUTOSCALER_PORT):
        assert f"{port} by convention" in readme and str(port) in config


def test_the_scrape_config_scrapes_the_web_the_workers_and_the_autoscaler():
    """prometheus.yml has a job for each kind of process; the web's path is /metrics."""
    jobs = {job["job_name"]: job for job in yaml.safe_load(SCRAPE_CONFIG.read_text())["scrape_configs"]}
    assert set(jobs) == {"queue-engine-web", "queue-engine-workers", "queue-engine-autoscaler"}
    assert jobs["queue-engine-web"]["metrics_path"] == "/metrics"
    assert jobs["queue-engine-autoscaler"]["static_configs"][0]["targets"] == [f"login-node:{metrics.AUTOSCALER_PORT}"]
    assert jobs["queue-engine-workers"]["file_sd_configs"][0]["files"]


@needs_promtool
def test_promtool_accepts_the_scrape_config():
    """`promtool check config` passes (a missing file_sd file is only a warning)."""
    checked = subprocess.run([PROMTOOL, "check", "config", str(SCRAPE_CONFIG)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_dashboard_reads_only_catalogued_metrics_and_shows_what_an_operator_needs():
    """Every metric a panel queries is in the catalogue (a histogram read through _bucket is a histogram);
    the queue, tokens, step time, latencies, outcomes and workers are all on it."""
    dashboard = json.loads(DASHBOARD.read_text())
    catalogued = {m.name: m for m in CATALOGUE}
    queried = set()
    for expression in dashboard_queries():
        for name in metric_names(expression):
            assert name in catalogued, f"{name} in {expression!r} is not a catalogued metric"
            queried.add(name)
        for name in re.findall(r"\b(qe_[a-z_]+)_bucket\b", expression):
            assert catalogued[name].type == "histogram", expression
    assert {"qe_queue_depth", "qe_queue_oldest_waiting_seconds", "qe_tokens_generated_total",
            "qe_engine_step_seconds", "qe_job_queue_wait_seconds", "qe_job_first_token_seconds",
            "qe_job_total_seconds", "qe_jobs_ended_total", "qe_autoscaler_workers"} <= queried
    assert {variable["name"] for variable in dashboard["templating"]["list"]} == {"datasource", "deployment"}
    assert len({panel["id"] for panel in dashboard["panels"]}) == len(dashboard["panels"])


@needs_promtool
def test_promtool_parses_every_dashboard_query(tmp_path):
    """Each panel's PromQL, the $deployment variable filled in, is valid (checked as recording rules)."""
    rules = [{"record": f"qe_dashboard:query{n}", "expr": expression.replace("$deployment", "main")}
             for n, expression in enumerate(dashboard_queries())]
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    checked = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(rules)} rules found" in checked.stdout
