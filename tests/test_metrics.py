"""The app's metrics (app.metrics) as a platform sees them: a run on S3 (moto's server behind the
fault-injecting proxy of tests/support/s3_faults.py, so that reads are retried and one image is left for a rerun),
on a local Ray that exports every node's metrics as a RayCluster does, scraped by a real Prometheus
(tests/support/prometheus.py). Every metric must hold the value the run's summary reports, and every query of the
chart's Grafana dashboard must return what the run did. The chart's alert rules are loaded into the same
Prometheus: each must be evaluated there without error and stay silent on these runs. Every query of the
dashboard and of the rules must parse and read only metrics the app exported."""

import json
import re
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime

import pytest
import ray

from app.config import compose_config
from app.detector import MAX_BATCH_PADDING
from app.metrics import BATCH_IMAGES_BUCKETS, METRICS, RunMetrics
from app.commit import InputsLeft
from app.pipeline import Summary, run
from tests.support.s3_faults import SLOW_DOWN, Rule, moto_behind_proxy
from tests.support.k8s_validation import find_helm_binaries, render
from tests.support.prometheus import PROMETHEUS, Prometheus, by, metric_names
from tests.support.images import gradient_jpeg, jpeg_bytes
from tests.support.models import FAST_MODEL

BUCKET = "metrics-test"
RUN = "metrics-test"
GOOD = 12
BAD = {"empty.jpg": (b"", "empty_file"), "page.jpg": (b"<!doctype html><p>404</p>", "not_an_image"),
       "truncated.jpg": (jpeg_bytes(64, 48)[:300], "corrupt_image")}
RETRIED_ONCE = ("img_002.jpg", "img_005.jpg", "img_009.jpg")  # each key's first GET fails
ALWAYS_FAILING = "img_011.jpg"  # every GET fails: left for a rerun after data.read_attempts=2
SELECTOR = f'{{run="{RUN}"}}'

pytestmark = [pytest.mark.slow, pytest.mark.skipif(PROMETHEUS is None, reason="needs Debian's prometheus package (scripts/test.sh installs it)")]


@dataclass
class Shipped:
    """What the chart ships for monitoring: its PrometheusRule's rule groups and its Grafana dashboard."""

    rule_groups: list[dict]
    dashboard: dict

    def alerts(self) -> dict[str, str]:
        """Each alert rule's expression, by the alert's name."""
        return {rule["alert"]: rule["expr"] for group in self.rule_groups for rule in group["rules"]}


@pytest.fixture(scope="module")
def shipped() -> Shipped:
    """The alert rules and the dashboard as a real helm renders them into the chart's PrometheusRule and
    ConfigMap."""
    objects = render(find_helm_binaries()[3], set_values=["monitoring.prometheusRule.enabled=true", "monitoring.dashboard.enabled=true"])
    [rule] = [item for item in objects if item["kind"] == "PrometheusRule"]
    [dashboard] = [item for item in objects if item["kind"] == "ConfigMap" and "ray-detect.json" in item.get("data", {})]
    return Shipped(rule["spec"]["groups"], json.loads(dashboard["data"]["ray-detect.json"]))


@dataclass
class Observed:
    """Two runs on one output as Prometheus saw them: the first (storage faults leave one input for a
    rerun) and the rerun; the counters after the first (`after_first`), the files, and when it all began."""

    prometheus: Prometheus
    first: Summary
    rerun: Summary
    after_first: dict[str, float]
    files: dict[str, bytes]
    started: float
    first_ended: float
    ended: float


def counters(prometheus: Prometheus) -> dict[str, float]:
    """The counters a run adds to (summed over their series), and the images by outcome."""
    values = {name: sum(prometheus.query(f"{name}{SELECTOR}").values()) for name in (
        "ray_detect_detections_total", "ray_detect_input_bytes_total", "ray_detect_read_retries_total",
        "ray_detect_decode_seconds_count", "ray_detect_model_seconds_count", "ray_detect_batch_images_count",
        "ray_detect_batch_padding_count")}
    outcomes = by("outcome", prometheus.query(f"sum by (outcome) (ray_detect_images_total{SELECTOR})"))
    return values | {f"images {outcome}": count for outcome, count in outcomes.items()}


@pytest.fixture(scope="module")
def observed(tmp_path_factory, shipped) -> Observed:
    """The runs, done once, with the Prometheus that scraped them and evaluated the chart's alert rules
    (still up: the driver's counters live as long as this process's Ray)."""
    files = {f"img_{i:03d}.jpg": gradient_jpeg(96, 72, i) for i in range(GOOD)} | {name: data for name, (data, _) in BAD.items()}
    overrides = [*FAST_MODEL, "inference.num_actors=auto", f"data.path=s3://{BUCKET}/in", f"output.path=s3://{BUCKET}/out", f"metrics.run={RUN}",
                 "data.read_attempts=2", "inference.batch_size=4", "output.lease_heartbeat_s=1", "output.lease_timeout_s=2"]
    with moto_behind_proxy(BUCKET) as (proxy, client):
        for name, data in files.items():
            client.put_object(Bucket=BUCKET, Key=f"in/{name}", Body=data)
        # Metrics reach the node's endpoint every 2 s (10 s by default), so that the test waits less.
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=300 * 1024**2,
                 _system_config={"metrics_report_interval_ms": 2000})
        try:
            targets = [f"127.0.0.1:{node['MetricsExportPort']}" for node in ray.nodes() if node["Alive"]]
            with Prometheus(tmp_path_factory.mktemp("prometheus"), targets, shipped.rule_groups) as prometheus:
                proxy.rules = [Rule(SLOW_DOWN, key="|".join(f"/in/{name}$" for name in RETRIED_ONCE), first=1),
                               Rule(SLOW_DOWN, key=f"/in/{ALWAYS_FAILING}$")]
                started = time.time()
                with pytest.raises(InputsLeft) as left:
                    run(compose_config(overrides))
                first, first_ended = left.value.summary, time.time()
                # Each metric reaches the node in its own export: wait for the slowest of them.
                prometheus.wait_for(lambda: (lambda now: now.get("images ok") == first.ok
                                             and now["ray_detect_read_retries_total"] == first.read_retries
                                             and now["ray_detect_decode_seconds_count"] == first.inputs
                                             and now["ray_detect_model_seconds_count"] == first.ok
                                             and now["ray_detect_input_bytes_total"] > 0)(counters(prometheus)),
                                    "the counters to reach the first run's totals")
                after_first = counters(prometheus)
                proxy.rules = []
                rerun = run(compose_config(overrides))
                prometheus.wait_for(lambda: counters(prometheus).get("images ok") == first.ok + rerun.processed
                                    and counters(prometheus)["ray_detect_decode_seconds_count"] == first.inputs + rerun.processed
                                    and counters(prometheus)["ray_detect_model_seconds_count"] == first.ok + rerun.processed and sum(
                    prometheus.query(f"last_over_time(ray_detect_images_done{SELECTOR}[10m])").values()) == rerun.inputs,
                                    "the counters and gauges to count the rerun")
                yield Observed(prometheus, first, rerun, after_first, files, started, first_ended, time.time())
        finally:
            ray.shutdown()


def test_every_metric_holds_the_value_the_summary_reports(observed):
    """Each counter holds the first run's figures (as its summary reports them, or as the test made
    them), and the rerun adds exactly the one image it read; the gauges and the actors too."""
    prometheus, first, rerun = observed.prometheus, observed.first, observed.rerun
    assert (first.ok, first.errors_by_kind, first.transient) == (GOOD - 1, {kind: 1 for _, kind in BAD.values()}, 1)
    assert first.read_retries == len(RETRIED_ONCE) + 1  # the always-failing key: retried once, then left
    assert first.detections == 3 * first.ok
    assert (rerun.processed, rerun.ok, rerun.transient, rerun.read_retries) == (1, GOOD, 0, 0)
    read = sum(len(data) for name, data in observed.files.items() if name != ALWAYS_FAILING)
    model_batches = observed.after_first["ray_detect_batch_images_count"]
    assert first.ok / 4 <= model_batches <= first.ok  # inference.batch_size=4
    assert model_batches == sum(first.model_batches.values())  # the batches the summary reports
    assert observed.after_first == {
        "images ok": first.ok, **{f"images {kind}": 1 for _, kind in BAD.values()}, "images transient": first.transient,
        "ray_detect_detections_total": first.detections,
        "ray_detect_input_bytes_total": read,  # every file but the one never read, the bad ones too
        "ray_detect_read_retries_total": first.read_retries,
        "ray_detect_decode_seconds_count": first.inputs,  # one decode per input
        "ray_detect_model_seconds_count": first.ok,  # one model time per image through the model
        "ray_detect_batch_images_count": model_batches, "ray_detect_batch_padding_count": model_batches,
    }
    after_rerun = counters(prometheus)
    assert after_rerun == observed.after_first | {
        "images ok": first.ok + 1, "ray_detect_detections_total": first.detections + 3,
        "ray_detect_input_bytes_total": read + len(observed.files[ALWAYS_FAILING]),
        "ray_detect_decode_seconds_count": first.inputs + 1, "ray_detect_model_seconds_count": first.ok + 1,
        "ray_detect_batch_images_count": model_batches + 1, "ray_detect_batch_padding_count": model_batches + 1,
    }

    # The histogram of images per model batch, bucket by bucket, as the summaries report the batches.
    sizes = Counter(first.model_batches) + Counter(rerun.model_batches)
    assert rerun.model_batches == {1: 1} and rerun.batch_size == first.batch_size == 4
    buckets = by("le", prometheus.query(f"sum by (le) (ray_detect_batch_images_bucket{SELECTOR})"))
    assert {float(le): count for le, count in buckets.items()} == {
        bound: sum(n for size, n in sizes.items() if size <= bound) for bound in map(float, [*BATCH_IMAGES_BUCKETS, "inf"])}

    def value(expr: str) -> float:
        return sum(prometheus.query(expr).values())

    busy = by("device", prometheus.query(f"sum by (device) (ray_detect_actor_busy_seconds_total{SELECTOR})"))
    assert list(busy) == ["cpu"] and 0 < busy["cpu"] <= 2 * (observed.ended - observed.started)  # two actors at most
    # Gauges go with the process that sets them: their last values (the rerun's).
    last = {name: value(f"last_over_time({name}{SELECTOR}[10m])") for name in
            ("ray_detect_inputs", "ray_detect_images_done", "ray_detect_images_failed", "ray_detect_max_error_fraction")}
    assert last == {"ray_detect_inputs": rerun.inputs, "ray_detect_images_done": rerun.inputs,
                    "ray_detect_images_failed": rerun.errors, "ray_detect_max_error_fraction": 0.5}
    last_commit = value(f"last_over_time(ray_detect_last_commit_timestamp_seconds{SELECTOR}[10m])")
    assert observed.started <= last_commit <= observed.ended
    assert value(f"ray_detect_lease_heartbeats_total{SELECTOR}") >= 1
    # Labels: the run's, the model's, and no path anywhere.
    series = prometheus.api("/api/v1/series", **{"match[]": '{__name__=~"ray_detect_.*"}'})
    assert {(item["run"], item["model"]) for item in series} == {(RUN, FAST_MODEL[0].removeprefix("model="))}
    assert not any("/" in value for item in series for key, value in item.items() if key in ("run", "model", "outcome", "device"))
    names = {re.sub(r"_(total|bucket|count|sum)$", "", item["__name__"]).removeprefix("ray_") for item in series}
    assert names == set(METRICS)


def dashboard_queries(dashboard: dict) -> list[tuple[str, str, str]]:
    """(panel title, legend, expr) of every query of the dashboard."""
    return [(panel["title"], target.get("legendFormat", ""), target["expr"])
            for panel in dashboard["panels"] for target in panel.get("targets", [])]


def as_grafana_sends(expr: str) -> str:
    """A dashboard query with its variables filled in as Grafana does for this run."""
    return expr.replace("$run", RUN).replace("$__rate_interval", "1m")


def test_every_dashboard_query_returns_what_the_runs_did(observed, shipped):
    """Each query of the dashboard as Grafana sends it for this run, over the runs: the last value of
    each series it returns."""
    prometheus, summary, started = observed.prometheus, observed.rerun, observed.started

    def series(expr: str, end: float = None) -> dict[tuple, list[float]]:
        """The query as Grafana sends it for this run, over the runs (or until `end`): each series' values
        (NaN left out)."""
        expr = as_grafana_sends(expr)
        # One step (1 s) past the end: the range's last point then falls after the last scrape the
        # fixture waited for, however soon after it this runs.
        values = prometheus.query_range(expr, started, (end or time.time()) + 1)
        numbers = {labels: [value for value in points if value == value] for labels, points in values.items()}  # NaN != NaN
        return {labels: points for labels, points in numbers.items() if points}

    queries = {title + (f" [{legend}]" if legend else ""): series(expr) for title, legend, expr in dashboard_queries(shipped.dashboard)}
    answers = {title: {labels: points[-1] for labels, points in values.items()} for title, values in queries.items()}
    plain = {title: sorted(values.values()) for title, values in answers.items()}
    # Progress: done over inputs, at each point (the last scrape of the rerun's gauges may fall between two
    # points of the range; "Images done" and "Inputs" above end at exactly 15 each).
    [progress] = queries["Progress"].values()
    assert all(round(value * summary.inputs, 6) in range(summary.inputs + 1) for value in progress)
    assert (summary.inputs - 1) / summary.inputs <= max(progress) <= 1.0
    assert [max(points) for points in queries["Images done"].values()] == [summary.inputs]
    assert [max(points) for points in queries["Inputs"].values()] == [summary.inputs]
    assert plain["Time left"] == [0.0]
    assert by("outcome", answers["Errors by kind [{{outcome}}]"]) == {**summary.errors_by_kind, "transient": observed.first.transient}
    # The first run's actors at their peak (an actor's gauge outlives it by up to two export intervals).
    actors_expr = next(expr for title, _, expr in dashboard_queries(shipped.dashboard) if title == "Detector actors")
    actors = {labels: max(points) for labels, points in series(actors_expr, observed.first_ended).items()}
    assert by("device", actors) == observed.first.detector_devices == {"cpu": 2}
    for title in ("Images per second [{{outcome}}]", "Busy fraction of the detector actors [{{device}}]",
                  "Seconds per image by stage [decode p50]", "Seconds per image by stage [model p50]",
                  "Seconds per image by stage [decode p95]", "Seconds per image by stage [model p95]",
                  "Bytes read per second", "Read retries per second", "Time since the last commit"):
        assert answers[title], f"{title} returned nothing"
    # Model time is counted as its rows are committed, so a window's busy time can run a little ahead.
    assert all(0 < value <= 1.5 for value in answers["Busy fraction of the detector actors [{{device}}]"].values())
    assert 1 <= plain["Images per model batch"][0] <= 4  # inference.batch_size
    assert all(0 <= value <= MAX_BATCH_PADDING for value in answers["Batch padding [p95]"].values())
    assert 0 <= plain["Time since the last commit"][0] <= time.time() - started
    assert plain["Lease heartbeats per minute"][0] > 0


def exported_metrics(prometheus: Prometheus) -> set[str]:
    """The names of every series Prometheus scraped from the Ray node (the app's metrics and Ray's own)."""
    return set(prometheus.api("/api/v1/label/__name__/values", **{"match[]": '{job="ray"}'}))


def unknown_metrics(queries: dict[str, str], exported: set[str]) -> dict[str, list[str]]:
    """For each query that reads a metric not in `exported`, those metrics' names."""
    return {where: sorted(metric_names(expr) - exported) for where, expr in queries.items() if metric_names(expr) - exported}


def test_every_alert_and_dashboard_query_parses_and_reads_only_metrics_the_app_exported(observed, shipped):
    """Each query of the chart (its alert rules, the dashboard's panels and its run variable), against
    the series the runs really exported: Prometheus parses it, and each metric it reads was scraped."""
    prometheus = observed.prometheus
    queries = {f"alert {name}": expr for name, expr in shipped.alerts().items()} | {
        f"panel {title}" + (f" [{legend}]" if legend else ""): as_grafana_sends(expr)
        for title, legend, expr in dashboard_queries(shipped.dashboard)}
    for expr in queries.values():
        prometheus.query(expr)  # an AssertionError with Prometheus's reason if it does not parse
    assert [where for where, expr in queries.items() if not metric_names(expr)] == []
    assert unknown_metrics(queries, exported_metrics(prometheus)) == {}
    # The run variable: Grafana's label_values(metric, label), which lists this run.
    [variable] = [item for item in shipped.dashboard["templating"]["list"] if item["name"] == "run"]
    metric, label = re.fullmatch(r"label_values\((\w+), *(\w+)\)", variable["query"]).groups()
    assert prometheus.api(f"/api/v1/label/{label}/values", **{"match[]": metric}) == [RUN]


def test_a_misspelt_metric_or_a_broken_query_is_reported(observed):
    """The checks above can fail: a misspelt metric is named, a query that does not parse is refused with
    Prometheus's reason."""
    misspelt = {"misspelt": f"sum(rate(ray_detect_image_total{SELECTOR}[1m])) / sum(rate(ray_detect_images_total{SELECTOR}[1m]))"}
    assert unknown_metrics(misspelt, exported_metrics(observed.prometheus)) == {"misspelt": ["ray_detect_image_total"]}
    with pytest.raises(AssertionError, match="unclosed left parenthesis"):
        observed.prometheus.query(f"sum by (run) (rate(ray_detect_images_total{SELECTOR}[1m])")


def test_a_count_that_starts_again_adds_up_across_the_restart():
    """The retry budget's actor counts from 0 again when Ray restarts it (a lost node): the run's total,
    and the counter, take what it holds then as new, rather than stopping at a negative difference."""
    said = iter([0, 5, 9, 3, 4])
    metrics = RunMetrics({"run": "restart", "model": "m"}, lambda: {
        "inputs": 1, "done": 0, "failed": 0, "max_error_fraction": 0.5, "last_commit": 0,
        "read_retries": next(said), "lease_heartbeats": 0})
    totals = []
    for _ in range(5):
        metrics.refresh()
        totals.append(metrics.totals["read_retries"])
    assert totals == [0, 5, 9, 12, 13]


def test_metric_names_are_the_selectors_of_an_expression():
    expr = ('sum by (le, run) (rate(a_bucket{run=~"x|y", note="rate(b) c"}[5m] offset 1h)) / on (run) group_left (model) '
            "max(recorded:c) > bool 0.5 * 1e3 unless time() - d")
    assert metric_names(expr) == {"a_bucket", "recorded:c", "d"}


def test_every_alert_rule_is_evaluated_without_error_and_stays_silent_on_the_runs(observed, shipped):
    """The chart's alert rules, evaluated every second by the Prometheus that scraped the runs: each is
    healthy (its expression worked on the app's series), none is pending or firing after the runs (the
    retried reads and the image left for the rerun are no alert's business). At the last scrape of the
    rerun's gauges each expression returns nothing, for its own reason: nothing is left (no progress),
    3 errors of 15 inputs are under data.max_error_fraction (0.5), the lease was renewed while the run's
    inputs gauge was there, and the actors are CPUs (GPU actors idle)."""
    prometheus, alerts = observed.prometheus, shipped.alerts()
    prometheus.wait_for(lambda: all(datetime.fromisoformat(rule["lastEvaluation"]).timestamp() > observed.ended
                                    for rule in prometheus.rules()), "every rule to be evaluated after the runs")
    rules = prometheus.rules()
    assert {rule["name"]: (rule["health"], rule.get("lastError", "")) for rule in rules} == {name: ("ok", "") for name in alerts}
    assert {rule["name"]: (rule["state"], rule["alerts"]) for rule in rules} == {name: ("inactive", []) for name in alerts}
    rerun = observed.rerun
    done = prometheus.samples(f"ray_detect_images_done{SELECTOR}")
    finished = max(at for points in done.values() for at, value in points if value == rerun.inputs)
    assert prometheus.query(f"max by (run) (ray_detect_inputs{SELECTOR})", at=finished) == {(("run", RUN),): rerun.inputs}
    assert prometheus.query(f"max(ray_detect_images_failed{SELECTOR}) / max(ray_detect_inputs{SELECTOR})", at=finished) == {
        (): rerun.errors / rerun.inputs}
    assert {name: prometheus.query(expr, at=finished) for name, expr in alerts.items()} == {name: {} for name in alerts}
