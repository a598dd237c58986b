"""Placement on a real multi-node Ray cluster on one machine (ray.cluster_utils.Cluster): a CPU-only head
node and a worker node that advertises one GPU. Detector actors must land on the GPU node and decode
tasks on the CPU node. No GPU exists on the machines these tests are built on, so the actor computes
on the CPU there (inference.cpu_fallback=true); where CUDA works, the worker's GPU is real and the actor
uses it: the placement test then expects the GPU, and the tests of an unusable GPU are skipped."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from ray.util.state import list_actors, list_tasks
from tests.support.images import write_images
from tests.support.jobs import IMAGES as LOG_IMAGES, check_clean_log, run_job
from tests.support.models import FAST_MODEL
from tests.support.ray_cluster import connected_cluster

pytestmark = pytest.mark.slow  # a multi-node Ray cluster


CUDA_WORKS = torch.cuda.is_available()
NEEDS_AN_UNUSABLE_GPU = pytest.mark.skipif(
    CUDA_WORKS, reason="CUDA works here, so the node's GPU resource is a usable GPU (test_device stands in an unusable one)")


@pytest.fixture(scope="module")
def gpu_cluster():
    with connected_cluster(2, dict(num_cpus=1, num_gpus=1)) as (cluster, (gpu_node,)):
        yield cluster, gpu_node


def test_detector_on_gpu_node_decode_on_cpu_node(gpu_cluster, tmp_path):
    """The command line attached to the cluster, as a RayJob's driver is. Without CUDA the worker's GPU is a
    resource only: inference.cpu_fallback=true lets its actor run on the CPU, and the summary, the manifest
    and the log say so; the actor's own warning reaches the driver's output (what `kubectl logs` shows of a
    RayJob), once. With CUDA the actor runs on the GPU, no warning."""
    cluster, gpu_node = gpu_cluster
    write_images(tmp_path / "in", 40)
    earlier = {a.actor_id for a in list_actors(limit=1000)}
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    args = [*FAST_MODEL, f"ray.address={cluster.address}", "inference.num_actors=auto", "inference.cpu_fallback=true",
            "inference.gpu_hour_price=3.0", f"data.path={tmp_path / 'in'}", f"output.path={tmp_path / 'out'}"]
    result = subprocess.run([sys.executable, "-m", "app", *args], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    device = f"cuda:{torch.cuda.get_device_name()}" if CUDA_WORKS else "cpu"
    assert "ray-detect: 40 images (40 ok, 0 errors: none), " in result.stdout
    assert (f"ray-detect: detector actors used: 1, on 1 node(s), holding 1 GPU(s); devices: {device} x1; at most at once: "
            f"{device.split(':')[0]} 1\n") in result.stdout
    fallback = "GPUs were requested, but 1 of 1 detector actors ran on the CPU (inference.cpu_fallback=true)"
    assert result.stdout.count(fallback) == (0 if CUDA_WORKS else 1)
    assert (result.stdout + result.stderr).count("; running on the CPU (inference.cpu_fallback=true)") == (0 if CUDA_WORKS else 1)
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert manifest["detector_by_last_run"] == {"actors": 1, "nodes": 1, "gpus": 1.0, "devices": {device: 1}}
    assert manifest["warnings"] == ([] if CUDA_WORKS else [fallback])
    assert manifest["versions"]["torch_cuda"] == torch.version.cuda
    # One GPU held for the run's wall time, at 3.0 a GPU-hour, over 40 images (the wall time is rounded in the
    # manifest, the cost is not).
    cost = manifest["cost_by_last_run"]
    wall = manifest["wall_seconds"]
    assert cost["gpu_hour_price"] == 3.0 and 0 < cost["model_seconds"] <= wall
    assert cost["model_busy_share"] == pytest.approx(cost["model_seconds"] / wall, abs=1e-3)
    assert cost["images_per_gpu_second"] == pytest.approx(40 / wall, rel=1e-3)
    assert cost["per_million_images"] == pytest.approx(3.0 * wall / 3600 / 40 * 1e6, rel=1e-3)
    # The GPU's busy share comes from NVML: none for an actor on the CPU.
    assert (cost["device_busy_share"] is None) == (not CUDA_WORKS)
    busy = "" if cost["device_busy_share"] is None else f"their GPUs were busy {cost['device_busy_share']:.0%} of the model calls' time; "
    assert (f"ray-detect: model calls took {cost['model_busy_share']:.0%} of the detector actors' time; {busy}"
            f"{cost['images_per_gpu_second']:.2f} images/s per GPU; {cost['per_million_images']:.2f} per million images "
            f"(inference.gpu_hour_price)\n") in result.stdout

    actors = [a for a in list_actors(limit=1000) if "Detector" in a.class_name and a.actor_id not in earlier]
    assert len(actors) == 1  # auto: one actor per GPU in the cluster
    assert {a.node_id for a in actors} == {gpu_node.node_id}
    decode_tasks = [t for t in list_tasks(limit=10000) if t.name.endswith("MapBatches(decode_images)")]
    # 40 files in blocks of 16, the most a decode call takes (the light model's GPU batch is 32)
    assert len(decode_tasks) == 3
    assert {t.node_id for t in decode_tasks} == {cluster.head_node.node_id}


def test_a_job_attached_to_the_cluster_puts_cpu_actors_on_both_nodes_and_logs_cleanly(gpu_cluster, tmp_path):
    """As in a RayJob: the command attaches through RAY_ADDRESS, and the actors' and tasks' output reaches
    its log (log_to_driver), which holds the app's lines and nothing alarming (tests/test_log.py). Without
    the GPU (inference.num_gpus=0), auto planning gives each 1-thread actor one CPU: two on the 2-CPU head,
    one on the worker; the images are cut into blocks small enough that every actor detects some."""
    cluster, gpu_node = gpu_cluster
    earlier = {a.actor_id for a in list_actors(limit=1000)}
    write_images(tmp_path / "in", LOG_IMAGES)
    result = run_job(tmp_path, "inference.num_gpus=0", address=cluster.address)
    check_clean_log(result, ["INFO worker.py", "Connecting to existing Ray cluster at address"])

    actors = [a for a in list_actors(limit=1000) if "Detector" in a.class_name and a.actor_id not in earlier]
    assert len(actors) == 3
    nodes = [a.node_id for a in actors]
    assert sorted(nodes.count(node) for node in set(nodes)) == [1, 2]
    busy = {t.actor_id for t in list_tasks(limit=10000) if t.actor_id in {a.actor_id for a in actors} and "submit" in t.name}
    assert busy == {a.actor_id for a in actors}


@NEEDS_AN_UNUSABLE_GPU
def test_a_gpu_actor_that_cannot_use_its_gpu_stops_the_run(gpu_cluster, tmp_path):
    """Without inference.cpu_fallback, the actor on the GPU node (a GPU resource with no CUDA behind it)
    stops the run before any row is committed: exit code 4 and one line saying why and what to do."""
    cluster, _ = gpu_cluster
    write_images(tmp_path / "in", 6)
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    args = [*FAST_MODEL, f"ray.address={cluster.address}", f"data.path={tmp_path / 'in'}", f"output.path={tmp_path / 'out'}"]
    result = subprocess.run([sys.executable, "-m", "app", *args], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 4, result.stderr[-3000:]
    # The app's own line; the actors' log lines reach the driver's output too, and may come after it.
    lines = [line for line in result.stderr.splitlines() if line.startswith("ray-detect: ")]
    assert len(lines) == 1, result.stderr[-3000:]
    pattern = (
        r"ray-detect: GPU unusable: the detector actor on node [0-9.]+ holds GPU\(s\) 0 but torch "
        + re.escape(f"{torch.__version__} (built for CUDA {torch.version.cuda}) cannot use them: ")
        + r"[^;]+; NVIDIA driver not found\. Run an image whose torch build supports the node's GPU and driver "
        r"\(this project's image needs compute capability 7\.5 or newer \(Turing and newer GPUs\) and NVIDIA "
        r"driver R580 or newer\), or set inference\.cpu_fallback=true to run the detector on the CPU deliberately"
    )
    assert re.fullmatch(pattern, lines[0]), lines[0]
    assert not list((tmp_path / "out").glob("part-*.parquet"))
