"""Losing a worker node or the driver mid-run still ends with each input exactly once.

Worker loss uses a real multi-node Ray cluster on one machine (ray.cluster_utils.Cluster); driver loss
SIGKILLs a real `python -m app` process (and the local Ray it started) and runs the command again."""

import os
import signal
import subprocess
import sys
import threading
import time

import pyarrow.dataset as pads
import pytest
import ray
from ray.util.state import list_actors

from app.output.dataset import MANIFEST_NAME, read_committed
from app.pipeline import run
from app.storage import resolve
from tests.conftest import (
    FAST_MODEL,
    assert_detections,
    compose_config,
    connected_cluster,
    model_detections,
    write_images,
)


def committed_parts(folder):
    return sorted(name for name in os.listdir(folder) if name.startswith("part-")) if folder.exists() else []


def wait_for(condition, timeout, what):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def expected_paths(folder, count):
    return sorted(str(folder / f"img_{i:03d}.jpg") for i in range(count))


def test_driver_killed_mid_run_then_rerun(tmp_path):
    write_images(tmp_path / "in", 60)
    command = [sys.executable, "-m", "app", *FAST_MODEL, "data.path=in", "output.path=out", "output.rows_per_file=4", "ray.num_cpus=2"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    driver = subprocess.Popen(command, cwd=tmp_path, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: len(committed_parts(tmp_path / "out")) >= 2, 240, "the first committed files")
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    before = read_committed(resolve(str(tmp_path / "out")), ["path"]).column("path").to_pylist()
    assert not (tmp_path / "out" / MANIFEST_NAME).exists()
    assert 8 <= len(before) < 60 and len(set(before)) == len(before)

    rerun = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "ray-detect: 60 images (60 ok, 0 errors: none), " in rerun.stdout
    assert f"; {60 - len(before)} processed by this run in " in rerun.stdout
    table = pads.dataset(str(tmp_path / "out"), format="parquet").to_table()
    assert sorted(table.column("path").to_pylist()) == expected_paths(tmp_path / "in", 60)
    # Rows from the killed run and from the rerun alike hold what the model gives on these pixels.
    cfg = compose_config([*FAST_MODEL, f"data.path={tmp_path / 'in'}", f"output.path={tmp_path / 'out'}"])
    assert_detections({row["path"]: row for row in table.to_pylist()}, model_detections(cfg, expected_paths(tmp_path / "in", 60)))
    assert (tmp_path / "out" / MANIFEST_NAME).exists()


@pytest.fixture
def three_node_cluster():
    with connected_cluster(1, dict(num_cpus=2), dict(num_cpus=2)) as (cluster, workers):
        yield cluster, workers


def test_worker_node_lost_while_detecting(three_node_cluster, tmp_path):
    cluster, workers = three_node_cluster
    write_images(tmp_path / "in", 120)
    cfg = compose_config(
        [*FAST_MODEL, f"data.path={tmp_path / 'in'}", f"output.path={tmp_path / 'out'}", "output.rows_per_file=4",
         "inference.num_actors=2", "inference.num_cpus_per_actor=1"]
    )
    outcome = {}
    job = threading.Thread(target=lambda: outcome.update(summary=run(cfg)), daemon=True)
    job.start()
    wait_for(lambda: len(committed_parts(tmp_path / "out")) >= 1, 240, "the detector's first rows")

    actor_nodes = {a.node_id for a in list_actors(filters=[("state", "=", "ALIVE")]) if "Detector" in a.class_name}
    victim = next(node for node in workers if node.node_id in actor_nodes)
    cluster.remove_node(victim)
    assert job.is_alive(), "the run ended before the node was removed"
    job.join(timeout=600)
    assert not job.is_alive()

    summary = outcome["summary"]
    assert (summary.inputs, summary.ok, summary.errors) == (120, 120, 0)
    table = pads.dataset(str(tmp_path / "out"), format="parquet").to_table()
    assert sorted(table.column("path").to_pylist()) == expected_paths(tmp_path / "in", 120)
    assert table.column("num_detections").to_pylist() == [3] * 120
    assert victim.node_id not in {n["NodeID"] for n in ray.nodes() if n["Alive"]}
