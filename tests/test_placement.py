"""Placement on a real multi-node Ray cluster on one machine (ray.cluster_utils.Cluster): a CPU-only head
node and a worker node that advertises one GPU. Detector actors must land on the GPU node and decode
tasks on the CPU node. No GPU exists here, so the actor computes on CPU there."""

import pytest
import ray
from ray.cluster_utils import Cluster
from ray.util.state import list_actors, list_tasks

from app.pipeline import run
from tests.conftest import FAST_MODEL, compose_config, write_images


@pytest.fixture(scope="module")
def gpu_cluster():
    cluster = Cluster(
        initialize_head=True,
        head_node_args=dict(num_cpus=2, include_dashboard=True, object_store_memory=200 * 1024**2),
    )
    gpu_node = cluster.add_node(num_cpus=1, num_gpus=1, object_store_memory=200 * 1024**2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster, gpu_node
    ray.shutdown()
    cluster.shutdown()


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
