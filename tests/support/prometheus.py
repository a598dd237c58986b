"""A real Prometheus server for the tests: Debian's `prometheus` package (scripts/test.sh installs it),
run on loopback against a temporary TSDB, scraping the given targets every second, and queried through
its HTTP API."""

import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Callable, Optional

import yaml

PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Prometheus:
    """A Prometheus process scraping `targets` ("host:port") every second; a context manager."""

    def __init__(self, folder: Path, targets: list[str]):
        self.folder, self.targets = folder, targets
        self.address = f"127.0.0.1:{free_port()}"
        self.process: Optional[subprocess.Popen] = None

    def __enter__(self) -> "Prometheus":
        self.folder.mkdir(parents=True, exist_ok=True)
        config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                  "scrape_configs": [{"job_name": "ray", "static_configs": [{"targets": self.targets}]}]}
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

    def api(self, path: str, **params) -> dict:
        body = self.get(f"{path}?{urllib.parse.urlencode(params)}" if params else path)
        assert body is not None, f"Prometheus did not answer {path}"
        answer = json.loads(body)
        assert answer["status"] == "success", answer
        return answer["data"]

    def query(self, expr: str, at: Optional[float] = None) -> dict[tuple, float]:
        """An instant query's value per series, keyed by the series' labels (sorted (name, value) pairs)."""
        params = {"query": expr, **({"time": f"{at:.3f}"} if at is not None else {})}
        data = self.api("/api/v1/query", **params)
        if data["resultType"] == "scalar":
            return {(): float(data["result"][1])}
        return {tuple(sorted(item["metric"].items())): float(item["value"][1]) for item in data["result"]}

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
