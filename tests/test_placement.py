"""Placement on a real multi-node Ray cluster on one machine (ray.cluster_utils.Cluster): a CPU-only head
node and a worker node that advertises one GPU. Detector actors must land on the GPU node and decode
tasks on the CPU node. No GPU exists here, so the actor computes on CPU there."""

import pytest
from ray.util.state import list_actors, list_tasks

from app.pipeline import run
from tests.conftest import FAST_MODEL, compose_config, connected_cluster, write_images


@pytest.fixture(scope="module")
def gpu_cluster():
    with connected_cluster(2, dict(num_cpus=1, num_gpus=1)) as (cluster, (gpu_node,)):
        yield cluster, gpu_node


def test_detector_on_gpu_node_decode_on_cpu_node(gpu_cluster, tmp_path):
    cluster, gpu_node = gpu_cluster
    write_images(tmp_path / "in", 40)
    cfg = compose_config([*FAST_MODEL, f"data.path={tmp_path / 'in'}", f"output.path={tmp_path / 'out'}"])
    summary = run(cfg)
    assert (summary.inputs, summary.ok) == (40, 40)

    gpu_node_id = gpu_node.node_id
    cpu_node_id = cluster.head_node.node_id
    actors = [a for a in list_actors(limit=1000) if "Detector" in a.class_name]
    assert len(actors) == 1  # auto: one actor per GPU in the cluster
    assert {a.node_id for a in actors} == {gpu_node_id}
    decode_tasks = [t for t in list_tasks(limit=10000) if t.name.endswith("MapBatches(decode_images)")]
    assert len(decode_tasks) == 3  # 40 files, 16 per task
    assert {t.node_id for t in decode_tasks} == {cpu_node_id}
