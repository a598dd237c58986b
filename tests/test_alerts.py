"""The alert rules of charts/ray-detect/rules/ray-detect.rules.yaml, checked and unit-tested by a real
promtool (Debian's prometheus package, which scripts/test.sh installs): each alert fires on the series of
tests/data/alert-rules-test.yaml made for it and stays silent on the others there. Those series carry the
names the app's metrics have in Prometheus; tests/test_metrics.py runs the same rules on a real run's series."""

import subprocess
from pathlib import Path

import pytest
import yaml

from app.metrics import METRICS
from tests.support.k8s_validation import CHART_DIR
from tests.support.prometheus import PROMTOOL, metric_names

RULES = CHART_DIR / "rules" / "ray-detect.rules.yaml"
RULE_TESTS = Path(__file__).parent / "data" / "alert-rules-test.yaml"

pytestmark = [pytest.mark.slow, pytest.mark.skipif(PROMTOOL is None, reason="needs Debian's prometheus package (scripts/test.sh installs it)")]


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, cwd=RULE_TESTS.parent, timeout=120)


def test_the_rules_are_valid():
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 4 rules found" in result.stdout


def test_each_alert_fires_on_its_series_and_stays_silent_on_the_others():
    result = promtool("test", "rules", RULE_TESTS.name)
    assert result.returncode == 0, result.stdout + result.stderr
    alerts = {rule["alert"] for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]}
    cases = [case for test in yaml.safe_load(RULE_TESTS.read_text())["tests"] for case in test["alert_rule_test"]]
    firing = {case["alertname"] for case in cases if case["exp_alerts"]}
    silent = {case["alertname"] for case in cases if not case["exp_alerts"]}
    assert firing == alerts == {"RayDetectNoProgress", "RayDetectErrorFractionAboveLimit", "RayDetectGpuActorsIdle",
                                "RayDetectLeaseHeartbeatsStopped"}
    # Each case that fires names one run; the others of its series are silent in the same case.
    assert all(len(case["exp_alerts"]) <= 1 for case in cases)
    assert silent == {"RayDetectNoProgress", "RayDetectGpuActorsIdle", "RayDetectLeaseHeartbeatsStopped"}


def app_metric_names() -> set[str]:
    """The names of the app's metrics (app.metrics.METRICS) in Prometheus: Ray's `ray_` prefix, `_total` on a
    counter, a histogram's `_bucket`, `_count` and `_sum` series."""
    suffixes = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_count", "_sum")}
    return {f"ray_{name}{suffix}" for name, (kind, _, _) in METRICS.items() for suffix in suffixes[kind]}


def test_the_hand_written_series_are_the_apps_metrics_and_feed_every_rule():
    """A misspelt series would leave a rule silent for the wrong reason: each series is one of the app's
    metrics, and each metric a rule reads has series in the cases."""
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    written = {item["series"].split("{")[0] for test in tests for item in test["input_series"]}
    read = {name for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"] for name in metric_names(rule["expr"])}
    assert sorted(written - app_metric_names()) == []
    assert sorted(read - written) == []
    assert len(read) == 8


def test_a_broken_expectation_fails_promtool(tmp_path):
    """The unit tests can fail: the same cases, expecting the stuck run's alert at minute 10 instead of
    none, are reported as a failure."""
    tests = yaml.safe_load(RULE_TESTS.read_text())
    tests["rule_files"] = [str(RULES)]
    tests["tests"][0]["alert_rule_test"][0]["exp_alerts"] = [{"exp_labels": {"severity": "critical", "run": "stuck"}}]
    (tmp_path / "broken.yaml").write_text(yaml.safe_dump(tests))
    result = subprocess.run([PROMTOOL, "test", "rules", str(tmp_path / "broken.yaml")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "alertname: RayDetectNoProgress, time: 10m" in result.stdout + result.stderr
