"""Losing worker nodes or the driver mid-run still ends with each input exactly once.

Worker loss uses a real multi-node Ray cluster on one machine (ray.cluster_utils.Cluster), whose nodes
holding detector actors are removed and replaced (spot nodes taken back); driver loss SIGKILLs a real
`python -m app` process attached to that cluster and runs the command again."""

import os
import signal
import subprocess
import sys
import time

import pyarrow.dataset as pads
import pytest
from ray.util.state import list_actors

from app.output.dataset import MANIFEST_NAME, read_committed
from app.pipeline import run
from app.storage import resolve
from app.config import compose_config
from tests.support.images import write_images
from tests.support.models import FAST_MODEL, assert_detections, model_detections
from tests.support.ray_cluster import connected_cluster

pytestmark = pytest.mark.slow  # multi-node Ray clusters and a driver killed mid-run


def committed_parts(folder):
    return sorted(name for name in os.listdir(folder) if name.startswith("part-")) if folder.exists() else []


def wait_for(condition, timeout, what):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def detector_nodes() -> set[str]:
    """The nodes of the detector actors alive now."""
    return {actor.node_id for actor in list_actors(filters=[("state", "=", "ALIVE")]) if "Detector" in actor.class_name}


def test_preemption_soak_nodes_replaced_and_the_driver_killed(tmp_path):
    """Spot nodes, short: a run of 72 images whose driver is its own process attached to a multi-node
    cluster on this machine (as a RayJob's driver is). Once some files are committed, a worker node that
    holds a detector actor is removed and a fresh one added, where that actor comes back; then the driver is SIGKILLed mid-run: what
    it committed holds each path once and no manifest. The command run again processes exactly the inputs
    without a row and writes the manifest. Exactly one row per input, each holding what the model gives on
    its pixels (rows of the killed run and of the rerun alike): what an undisturbed run commits. (The
    benchmark's chaos suite runs the long soak: 2,000 images, 5 removals.)"""
    count = 72
    paths = write_images(tmp_path / "in", count)
    with connected_cluster(1, dict(num_cpus=2), dict(num_cpus=2)) as (cluster, workers):
        overrides = [*FAST_MODEL, f"data.path={tmp_path / 'in'}", f"output.path={tmp_path / 'out'}", "output.rows_per_file=4",
                     "output.commit_interval_s=0", "inference.num_actors=2", "inference.num_cpus_per_actor=2",
                     "inference.batch_size=2", f"ray.address={cluster.address}"]
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        driver = subprocess.Popen([sys.executable, "-m", "app", *overrides], env=env, start_new_session=True,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for(lambda: len(committed_parts(tmp_path / "out")) >= 2, 300, "committed files")
            wait_for(lambda: detector_nodes() & {node.node_id for node in workers}, 300, "a detector actor on a worker node")
            victim = next(node for node in workers if node.node_id in detector_nodes())
            cluster.remove_node(victim)
            replacement = cluster.add_node(num_cpus=2, object_store_memory=200 * 1024**2)
            assert driver.poll() is None, "the run ended before the node was replaced"
            seen = len(committed_parts(tmp_path / "out"))
            # Each actor takes a worker node's 2 CPUs: the lost one can only come back on the replacement.
            wait_for(lambda: replacement.node_id in detector_nodes(), 300, "a detector actor on the replacement node")
            wait_for(lambda: len(committed_parts(tmp_path / "out")) >= seen + 2, 300, "files after the replacement")
            assert driver.poll() is None, "the run ended before its driver was killed"
        finally:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
        before = read_committed(resolve(str(tmp_path / "out")), ["path"]).column("path").to_pylist()
        assert 8 <= len(before) < count and len(set(before)) == len(before)
        assert not (tmp_path / "out" / MANIFEST_NAME).exists()

        cfg = compose_config([*FAST_MODEL, f"data.path={tmp_path / 'in'}", f"output.path={tmp_path / 'out'}",
                              "output.rows_per_file=4", "inference.batch_size=2", "output.lease_wait_s=0"])
        summary = run(cfg)
    assert (summary.inputs, summary.ok, summary.errors, summary.errors_by_kind, summary.processed) == (count, count, 0, {}, count - len(before))
    table = pads.dataset(str(tmp_path / "out"), format="parquet").to_table()
    assert sorted(table.column("path").to_pylist()) == sorted(str(path) for path in paths)
    assert_detections({row["path"]: row for row in table.to_pylist()}, model_detections(cfg, paths))
    assert (tmp_path / "out" / MANIFEST_NAME).exists() and not (tmp_path / "out" / "_staging").exists()

