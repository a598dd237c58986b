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
    assert (summary.detector_actors, summary.detector_nodes, summary.detector_gpus) == (1, 1, 1.0)

    gpu_node_id = gpu_node.node_id
    cpu_node_id = cluster.head_node.node_id
    actors = [a for a in list_actors(limit=1000) if "Detector" in a.class_name]
    assert len(actors) == 1  # auto: one actor per GPU in the cluster
    assert {a.node_id for a in actors} == {gpu_node_id}
    decode_tasks = [t for t in list_tasks(limit=10000) if t.name.endswith("MapBatches(decode_images)")]
    # 40 files in blocks of 16, the most a decode call takes (the light model's GPU batch is 32)
    assert len(decode_tasks) == 3
    assert {t.node_id for t in decode_tasks} == {cpu_node_id}


def test_cpu_actors_fill_both_nodes_and_all_get_work(gpu_cluster, tmp_path):
    """Without the GPU, auto planning gives each 1-thread actor one CPU: two on the 2-CPU head, one on
    the worker. The images are cut into blocks small enough that every actor detects some."""
    cluster, gpu_node = gpu_cluster
    earlier = {a.actor_id for a in list_actors(limit=1000)}
    write_images(tmp_path / "in", 24)
    overrides = [*FAST_MODEL, "inference.num_gpus=0", f"data.path={tmp_path / 'in'}", f"output.path={tmp_path / 'out'}"]
    summary = run(compose_config(overrides))
    assert (summary.inputs, summary.ok) == (24, 24)

    actors = [a for a in list_actors(limit=1000) if "Detector" in a.class_name and a.actor_id not in earlier]
    assert len(actors) == 3
    nodes = [a.node_id for a in actors]
    assert sorted(nodes.count(node) for node in set(nodes)) == [1, 2]
    busy = {t.actor_id for t in list_tasks(limit=10000) if t.actor_id in {a.actor_id for a in actors} and "submit" in t.name}
    assert busy == {a.actor_id for a in actors}
