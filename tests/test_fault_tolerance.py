"""Losing worker nodes or the driver mid-run still ends with each input exactly once.

Worker loss uses a real multi-node Ray cluster on one machine (ray.cluster_utils.Cluster), whose nodes
holding detector actors are removed and replaced (spot nodes taken back); driver loss SIGKILLs a real
`python -m app` process (with the local Ray it started, or attached to that cluster) and runs the
command again."""

import os
import signal
import subprocess
import sys
import time

import pyarrow.dataset as pads
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


def detector_nodes() -> set[str]:
    """The nodes of the detector actors alive now."""
    return {actor.node_id for actor in list_actors(filters=[("state", "=", "ALIVE")]) if "Detector" in actor.class_name}


def test_preemption_soak_nodes_replaced_and_the_driver_killed(tmp_path):
    """Spot nodes, short: a run of 240 images whose driver is its own process attached to a multi-node
    cluster on this machine (as a RayJob's driver is). Three times, once more files are committed, a worker
    node that holds a detector actor is removed and a fresh one added; then the driver is SIGKILLed, and the
    command run again finishes the dataset. Exactly one row per input, each holding what the model gives
    on its pixels: what an undisturbed run commits. (The benchmark's chaos figures run a longer soak.)"""
    count = 240
    paths = write_images(tmp_path / "in", count)
    with connected_cluster(1, dict(num_cpus=2), dict(num_cpus=2)) as (cluster, workers):
        overrides = [*FAST_MODEL, f"data.path={tmp_path / 'in'}", f"output.path={tmp_path / 'out'}", "output.rows_per_file=4",
                     "output.commit_interval_s=0", "inference.num_actors=2", "inference.num_cpus_per_actor=1",
                     "inference.batch_size=2", f"ray.address={cluster.address}"]
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        driver = subprocess.Popen([sys.executable, "-m", "app", *overrides], env=env, start_new_session=True,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        removed = []
        try:
            for _ in range(3):
                seen = len(committed_parts(tmp_path / "out"))
                wait_for(lambda: len(committed_parts(tmp_path / "out")) >= seen + 2, 300, "more committed files")
                wait_for(lambda: detector_nodes() & {node.node_id for node in workers}, 300, "a detector actor on a worker node")
                victim = next(node for node in workers if node.node_id in detector_nodes())
                cluster.remove_node(victim)
                workers = [node for node in workers if node is not victim] + [cluster.add_node(num_cpus=2, object_store_memory=200 * 1024**2)]
                removed.append(victim.node_id)
                assert driver.poll() is None, "the run ended before the nodes were replaced"
            seen = len(committed_parts(tmp_path / "out"))
            wait_for(lambda: len(committed_parts(tmp_path / "out")) >= seen + 2, 300, "files after the last replacement")
            assert driver.poll() is None, "the run ended before its driver was killed"
        finally:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
        before = read_committed(resolve(str(tmp_path / "out")), ["path"]).column("path").to_pylist()
        assert len(set(before)) == len(before) < count
        assert not (tmp_path / "out" / MANIFEST_NAME).exists()

        cfg = compose_config([*FAST_MODEL, f"data.path={tmp_path / 'in'}", f"output.path={tmp_path / 'out'}",
                              "output.rows_per_file=4", "inference.batch_size=2", "output.lease_wait_s=0"])
        summary = run(cfg)
    assert len(set(removed)) == 3
    assert (summary.inputs, summary.ok, summary.processed) == (count, count, count - len(before))
    table = pads.dataset(str(tmp_path / "out"), format="parquet").to_table()
    assert sorted(table.column("path").to_pylist()) == sorted(str(path) for path in paths)
    assert_detections({row["path"]: row for row in table.to_pylist()}, model_detections(cfg, paths))
