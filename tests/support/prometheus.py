"""A real Prometheus server for the tests: Debian's `prometheus` package (scripts/test.sh installs it),
run on loopback against a temporary TSDB, scraping the given targets and evaluating the given alert rules
every second, and queried through its HTTP API. Also `metric_names`, the metrics a PromQL expression reads."""

import json
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import yaml
from tests.support.ports import free_port

PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")


class Prometheus:
    """A Prometheus process scraping `targets` ("host:port") every second, as job "ray", and evaluating the
    rule groups `rule_groups` (a rule file's `groups`) every second; a context manager."""

    def __init__(self, folder: Path, targets: list[str], rule_groups: Sequence[dict] = ()):
        self.folder, self.targets, self.rule_groups = folder, targets, list(rule_groups)
        self.address = f"127.0.0.1:{free_port()}"
        self.process: Optional[subprocess.Popen] = None

    def __enter__(self) -> "Prometheus":
        self.folder.mkdir(parents=True, exist_ok=True)
        config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                  "scrape_configs": [{"job_name": "ray", "static_configs": [{"targets": self.targets}]}]}
        if self.rule_groups:
            (self.folder / "rules.yaml").write_text(yaml.safe_dump({"groups": self.rule_groups}))
            config["rule_files"] = [str(self.folder / "rules.yaml")]
        (self.folder / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = open(self.folder / "prometheus.log", "w")
        self.process = subprocess.Popen(
            [PROMETHEUS, f"--config.file={self.folder / 'prometheus.yml'}", f"--storage.tsdb.path={self.folder / 'data'}",
             f"--web.listen-address={self.address}"], stdout=self.log, stderr=subprocess.STDOUT)
        self.wait_for(lambda: self.get("/-/ready") is not None, "Prometheus to be ready")
        self.wait_for(lambda: all(target["health"] == "up" for target in self.api("/api/v1/targets")["activeTargets"]),
                      "every target to be up")
        return self

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)
        self.log.close()

    def get(self, path: str) -> Optional[bytes]:
        try:
            with urllib.request.urlopen(f"http://{self.address}{path}", timeout=10) as response:
                return response.read()
        except OSError:
            return None

    def api(self, path: str, **params) -> Any:
        """The `data` of an API answer; an AssertionError with Prometheus's reason if it refused (a query
        that does not parse, say)."""
        url = f"http://{self.address}{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                answer = json.loads(response.read())
        except urllib.error.HTTPError as error:  # a refusal: 4xx or 5xx with the reason in JSON
            answer = json.loads(error.read())
        except OSError as error:
            raise AssertionError(f"Prometheus did not answer {path}: {error}") from error
        assert answer["status"] == "success", f"Prometheus refused {path} {params}: {answer.get('error', answer)}"
        return answer["data"]

    def rules(self) -> list[dict]:
        """Every loaded rule as /api/v1/rules reports it: name, query, health, state, alerts, lastEvaluation..."""
        return [rule for group in self.api("/api/v1/rules")["groups"] for rule in group["rules"]]

    def query(self, expr: str, at: Optional[float] = None) -> dict[tuple, float]:
        """An instant query's value per series, keyed by the series' labels (sorted (name, value) pairs)."""
        params = {"query": expr, **({"time": f"{at:.3f}"} if at is not None else {})}
        data = self.api("/api/v1/query", **params)
        if data["resultType"] == "scalar":
            return {(): float(data["result"][1])}
        return {tuple(sorted(item["metric"].items())): float(item["value"][1]) for item in data["result"]}

    def samples(self, selector: str, window: str = "10m") -> dict[tuple, list[tuple[float, float]]]:
        """The stored samples (unix time, value) of each series of `selector` over the last `window`."""
        data = self.api("/api/v1/query", query=f"{selector}[{window}]")
        return {tuple(sorted(item["metric"].items())): [(float(at), float(value)) for at, value in item["values"]]
                for item in data["result"]}

    def query_range(self, expr: str, start: float, end: float, step: float = 1.0) -> dict[tuple, list[float]]:
        """A range query's values per series over [start, end]."""
        data = self.api("/api/v1/query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}", step=f"{step:g}")
        return {tuple(sorted(item["metric"].items())): [float(value) for _, value in item["values"]] for item in data["result"]}

    def wait_for(self, condition: Callable[[], bool], what: str, timeout_s: float = 120) -> None:
        """Poll `condition` every half second until it holds; fail naming `what` after timeout_s."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if condition():
                    return
            except (AssertionError, KeyError, OSError):
                pass
            if self.process.poll() is not None:
                raise AssertionError(f"Prometheus exited with {self.process.returncode}: {(self.folder / 'prometheus.log').read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
            time.sleep(0.5)


def by(label: str, values: dict[tuple, float]) -> dict[str, float]:
    """Query values keyed by one label's value."""
    return {dict(labels).get(label, ""): value for labels, value in values.items()}


# Words of PromQL that are not metric names: operators, modifiers and literals.
PROMQL_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left",
                   "group_right", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: each selector's name. Strings, label matchers `{...}`,
    ranges `[...]` and label lists (`by (...)`, `on (...)`, ...) are cut out first; what is left that looks
    like a name, is no keyword and is not followed by `(` (a function) names a metric. A selector written
    only as `{__name__="..."}` is not seen."""
    cut = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', "", expr)
    cut = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", cut)
    cut = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", cut)
    words = re.findall(r"(?<![\w.:])([a-zA-Z_:][\w:]*+)(?!\s*\()", cut)
    return {word for word in words if word.lower() not in PROMQL_KEYWORDS}
