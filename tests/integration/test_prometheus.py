"""A real Prometheus (Debian's ``prometheus`` 2.42) scrapes ``queue-engine
serve --workers 2`` (cluster mode: gunicorn, counters shared through
prometheus_client's multiprocess files) and a real worker (vLLM on the tiny
model) every second. Queries over its HTTP API find the queue rise and fall,
the tokens counter equal to the jobs' ``completion_tokens``, the outcomes
adding up to what was submitted, and every metric of the README's table."""

import io
import json
import secrets
import shutil
import subprocess
import time

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from queue_engine.client import Client
from queue_engine.metrics import CATALOGUE
from tests.conftest import make_key
from tests.helpers import free_port, metric_value, spawn, stop_process, wait_until, wait_until_serving
from tests.integration.conftest import Cluster

PROMETHEUS = shutil.which("prometheus")
pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(PROMETHEUS is None, reason="prometheus is not installed (apt-get install prometheus)")]

#: A model no worker serves: its requests wait until they are cancelled.
IDLE_MODEL = '[models.idle]\npath = "{tiny}"\nengine_args = { max_model_len = 512, seed = 0 }\n'
IDLE_JOBS = 6
TINY_JOBS = 12
BATCH_ROWS = 40  # and one that fails at upload


class Prometheus:
    """A prometheus server on a free port with a generated config, scraping
    ``targets`` (``{job name: "host:port"}``) every second."""

    def __init__(self, directory, targets):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = directory / "prometheus.yml"
        config.write_text(json.dumps({  # JSON is YAML
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [{"job_name": job, "static_configs": [{"targets": [target]}]}
                               for job, target in targets.items()],
        }))
        self.log_path = directory / "prometheus.log"
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={directory / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
                stdout=log, stderr=subprocess.STDOUT)
        wait_until(self.ready, 60, f"prometheus to be ready (log: {self.log_path})", 0.2)

    def ready(self):
        assert self.process.poll() is None, f"prometheus exited:\n{self.log_path.read_text()}"
        try:
            return requests.get(self.url + "/-/ready", timeout=2).ok
        except requests.RequestException:
            return False

    def query(self, expression, at=None):
        """The instant vector of ``expression`` (at ``at``, Unix seconds; default now)."""
        params = {"query": expression, **({"time": at} if at is not None else {})}
        answer = requests.get(self.url + "/api/v1/query", params=params, timeout=10).json()
        assert answer["status"] == "success", answer
        return answer["data"]["result"]

    def value(self, expression, at=None):
        """The one value of a scalar-valued vector expression (0 when it is empty)."""
        result = self.query(expression, at)
        assert len(result) <= 1, result
        return float(result[0]["value"][1]) if result else 0.0

    def series(self, expression, start, end):
        """The values of a one-series expression every second from ``start`` to ``end``."""
        answer = requests.get(self.url + "/api/v1/query_range", timeout=10, params={
            "query": expression, "start": start, "end": end, "step": "1s"}).json()
        assert answer["status"] == "success", answer
        return [float(v) for _, v in answer["data"]["result"][0]["values"]] if answer["data"]["result"] else []

    def stop(self):
        stop_process(self.process)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_model_dir, redis_server, cluster_database_url):
    """Web + a warm worker for ``tiny``, and the model ``idle`` that no worker serves."""
    cluster = Cluster(tmp_path_factory.mktemp("cluster"), tiny_model_dir, redis_server.url, cluster_database_url,
                      config_toml=IDLE_MODEL, lease_seconds=3)
    try:
        cluster.start_worker()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def serve(cluster):
    """``queue-engine serve --workers 2`` in cluster mode, beside the cluster's own web: its URL."""
    port = free_port()
    log_path = cluster.directory / "serve.log"
    process = spawn(["serve", "--port", str(port), "--workers", "2"], cluster.env, log_path)
    cluster.processes.append(process)  # stopped with the cluster
    url = f"http://127.0.0.1:{port}"
    wait_until_serving(url, process, log_path, 120)
    return url


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory, cluster, serve):
    server = Prometheus(tmp_path_factory.mktemp("prometheus"), {
        "serve": serve.removeprefix("http://"), "worker": f"127.0.0.1:{cluster.workers[0].metrics_port}"})
    try:
        yield server
    finally:
        server.stop()


def scraped_after(prometheus, moment):
    """Wait until Prometheus has scraped both targets, up, after ``moment``."""
    wait_until(lambda: prometheus.value('count(up{job=~"serve|worker"} == 1)') == 2
               and prometheus.value('min(timestamp(up{job=~"serve|worker"}))') > moment, 60,
               "both targets scraped and up", 0.2)


def baseline_time(prometheus):
    """A moment at which Prometheus holds a scrape of both targets (what they counted
    before it, the worker's warm-up job, is the baseline), and has scraped both since."""
    scraped_after(prometheus, 0)
    moment = time.time()
    scraped_after(prometheus, moment)
    return moment


def increase(prometheus, expression, since):
    """How much ``expression`` (a sum of counters) rose from ``since`` to now."""
    return prometheus.value(expression) - prometheus.value(expression, at=since)


def test_prometheus_sees_the_queue_rise_and_fall_tokens_and_outcomes_add_up(cluster, serve, prometheus):
    """Through `serve --workers 2`: waiting jobs raise the queue and cancels drain it; jobs and a batch
    run on the worker; then the tokens counter equals the jobs' completion tokens and every submitted job
    is counted as ended, by outcome, with its latencies."""
    key, _ = make_key(cluster.sessions, "prometheus")
    client = Client(serve, key.key)
    since = baseline_time(prometheus)

    # The queue of a model without a worker: it rises, ages and falls to zero when the jobs are cancelled.
    idle = [client.submit_job({"model": "idle", "prompt": f"wait {n}"}) for n in range(IDLE_JOBS)]
    depth = 'max(qe_queue_depth{model="idle", lane="interactive"})'
    wait_until(lambda: prometheus.value(depth) == IDLE_JOBS, 30, "Prometheus to see the idle queue")
    wait_until(lambda: prometheus.value('max(qe_queue_oldest_waiting_seconds{model="idle", lane="interactive"})') >= 2,
               30, "the oldest idle job to be seen waiting 2 s")
    for job in idle:
        assert client.cancel_job(job["id"])["status"] == "cancelled"
    wait_until(lambda: prometheus.value(depth) == 0 and prometheus.value(
        'max(qe_queue_oldest_waiting_seconds{model="idle", lane="interactive"})') == 0, 30, "the idle queue to drain")
    seen = prometheus.series(depth, since, time.time())  # rose from 0 to all of them (and fell: above)
    assert seen[0] == 0 and max(seen) == IDLE_JOBS

    # Work for the worker: single jobs and a batch with one row that fails at upload.
    jobs = [client.submit_job({"model": "tiny", "prompt": f"The number {n} is",
                               "params": {"max_tokens": 8 + n, "temperature": 0}}) for n in range(TINY_JOBS)]
    rows = "id,prompt\n" + "".join(f"r{n},Tell me about {n}\n" for n in range(BATCH_ROWS)) + "bad,\n"
    batch = client.submit_batch(io.BytesIO(rows.encode()), "tiny", filename="rows.csv", params={"max_tokens": 12})
    ended_jobs = [client.wait_for_job(job["id"], timeout=300) for job in jobs]
    ended_batch = client.wait_for_batch(batch["id"], timeout=300)
    assert {job["status"] for job in ended_jobs} == {"succeeded"}
    assert ended_batch["request_counts"] == {"total": BATCH_ROWS + 1, "completed": BATCH_ROWS, "failed": 1,
                                             "cancelled": 0}
    completion_tokens = (sum(job["usage"]["completion_tokens"] for job in ended_jobs)
                         + ended_batch["usage"]["completion_tokens"])
    submitted = IDLE_JOBS + TINY_JOBS + BATCH_ROWS + 1
    answered = TINY_JOBS + BATCH_ROWS

    def counted():
        return (increase(prometheus, "sum(qe_jobs_submitted_total)", since),
                increase(prometheus, "sum(qe_jobs_ended_total)", since),
                increase(prometheus, 'sum(qe_tokens_generated_total{model="tiny"})', since))

    wait_until(lambda: counted() == (submitted, submitted, completion_tokens), 30,
               f"Prometheus to count {submitted} submitted and ended and {completion_tokens} tokens")
    by_outcome = {outcome: increase(prometheus, f'sum(qe_jobs_ended_total{{outcome="{outcome}"}})', since)
                  for outcome in ("succeeded", "failed", "cancelled")}
    assert by_outcome == {"succeeded": answered, "failed": 1, "cancelled": IDLE_JOBS}
    assert increase(prometheus, 'sum(qe_jobs_ended_total{kind="batch_item"})', since) == BATCH_ROWS + 1
    for histogram in ("qe_job_queue_wait_seconds", "qe_job_first_token_seconds", "qe_job_total_seconds"):
        assert increase(prometheus, f"sum({histogram}_count)", since) == answered, histogram
    p95 = prometheus.value('histogram_quantile(0.95, sum by (le) (rate(qe_job_total_seconds_bucket[5m])))')
    assert 0 < p95 < 300
    wait_until(lambda: prometheus.value('sum(qe_queue_depth{model="tiny"}) + sum(qe_queue_running{model="tiny"})') == 0,
               30, "Prometheus to see tiny's queue empty")  # read at serve's next scrape
    assert increase(prometheus, "sum(qe_engine_step_seconds_count)", since) > 0
    assert prometheus.value("sum(qe_engine_load_seconds)") > 0


def samples_of(url):
    """``{metric family: [label sets]}`` of the qe_ samples one scrape of ``url`` shows."""
    text = requests.get(url, timeout=10).text
    found = {}
    for family in text_string_to_metric_families(text):
        # A metric another kind of process counts is registered here too, without samples: not shown.
        if family.name.startswith("qe_") and family.samples:
            found.setdefault(family.name, []).extend(
                frozenset(label for label in sample.labels if label != "le") for sample in family.samples)
    return found


def test_every_metric_of_the_catalogue_is_in_a_real_scrape_with_its_labels(cluster, serve, prometheus):
    """Each catalogued metric that the web or a worker exposes is in that process's scrape, every sample
    with exactly the catalogued labels, and no qe_ metric is there that the catalogue lacks; Prometheus
    holds a series of each."""
    scrapes = {"web": samples_of(serve + "/metrics"),
               "worker": samples_of(f"http://127.0.0.1:{cluster.workers[0].metrics_port}/metrics")}
    catalogued = {metric.name: metric for metric in CATALOGUE}
    for process, found in scrapes.items():
        # The parser names a counter's family without its _total.
        names = {name if name in catalogued else f"{name}_total" for name in found}
        assert names <= set(catalogued), f"{process} shows uncatalogued metrics: {names - set(catalogued)}"
        expected = {metric.name for metric in CATALOGUE if process in metric.exposed_by}
        assert expected <= names, f"{process} lacks {expected - names}"
        for name, label_sets in found.items():
            metric = catalogued[name if name in catalogued else f"{name}_total"]
            assert set(label_sets) == {frozenset(metric.labels)}, (process, name, set(label_sets))
    in_prometheus = {entry["metric"]["__name__"] for entry in prometheus.query('count by (__name__) ({__name__=~"qe_.+"})')}
    for metric in CATALOGUE:
        if {"web", "worker"} & set(metric.exposed_by):
            names = {metric.name} if metric.type != "histogram" else {f"{metric.name}_count"}
            assert names <= in_prometheus, metric.name


#: A worker job that never serves: its setup sleeps (so it stays pending or starting).
SLEEPING = ('[models.{model}]\npath = "{{tiny}}"\n[models.{model}.slurm]\n'
            'cpus = 1\nmem = "100M"\ntime = "00:10:00"\nsetup = ["sleep 600"]\ntarget_backlog_per_worker = 1\n')


def test_queue_engine_autoscale_serves_its_decisions_and_workers_by_state(
        tmp_path, tiny_model_dir, redis_server, cluster_database_url, local_slurm):
    """`queue-engine autoscale --metrics-port` against the local slurmctld: two waiting jobs make it
    decide up, its scrape shows both worker jobs by state and that it leads, with the catalogued labels."""
    model = f"scaled{secrets.token_hex(2)}"
    deployment = f"m{secrets.token_hex(3)}"
    config = f'[autoscaler]\ndeployment = "{deployment}"\ninterval = 0.2\n' + SLEEPING.format(model=model)
    cluster = Cluster(tmp_path, tiny_model_dir, redis_server.url, cluster_database_url, config_toml=config)
    slurm = local_slurm.client()
    try:
        client = cluster.new_client()
        for _ in range(2):
            client.submit_job({"model": model, "prompt": "x"})
        port = free_port()
        process = spawn(["autoscale", "--metrics-port", str(port)], {**cluster.env, **local_slurm.env},
                        cluster.directory / "autoscale.log")
        cluster.processes.append(process)
        url = f"http://127.0.0.1:{port}/metrics"

        def scraped(name, **labels):
            assert process.poll() is None, (cluster.directory / "autoscale.log").read_text()
            try:
                return metric_value(requests.get(url, timeout=5).text, name, deployment=deployment, **labels)
            except requests.ConnectionError:
                return 0.0

        wait_until(lambda: scraped("qe_autoscaler_decisions_total", model=model, action="up") >= 1, 60,
                   "the autoscaler to decide up")
        wait_until(lambda: scraped("qe_autoscaler_workers", model=model) == 2, 30, "two worker jobs shown")
        assert scraped("qe_autoscaler_desired_workers", model=model) == 2
        assert scraped("qe_autoscaler_leading") == 1
        assert scraped("qe_autoscaler_workers", model=model, state="serving") == 0  # they only sleep
        found = samples_of(url)
        for metric in CATALOGUE:
            if "autoscaler" in metric.exposed_by:
                name = metric.name.removesuffix("_total") if metric.type == "counter" else metric.name
                assert set(found[name]) == {frozenset(metric.labels)}, metric.name
    finally:
        slurm.cancel([job.job_id for job in slurm.jobs([f"qe-{deployment}-{model}"])])
        cluster.stop()
