"""An autoscaling Ray cluster on one machine (ray.cluster_utils.AutoscalingCluster, autoscaler v2, Ray's
fake node provider): a head with 2 CPUs and no GPU, and a worker type advertising one GPU, 0 to 2 of
them, none up at the start. No GPU exists here: the fake GPU nodes' actors compute on the CPU
(inference.cpu_fallback=true).

AutoscalingCluster starts and stops with `ray stop --force`, which ends every Ray process on the
machine, so this module starts its cluster only once the modules before it have shut theirs down
(their fixtures are module-scoped) and leaves none behind."""

import os
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import yaml
from ray.cluster_utils import AutoscalingCluster
from ray.util.state import list_actors, list_nodes

from app.detector import Detector
from app.pipeline import run
from app.config import compose_config
from tests.support.images import write_images
from tests.support.models import FAST_MODEL

pytestmark = pytest.mark.slow  # an autoscaling Ray cluster

IDLE_TIMEOUT_S = 6
BARRIER = "detector-barrier"
ACTORS = 2  # the GPU nodes the cluster may add: RAY_DETECT_MAX_GPUS


@ray.remote(num_cpus=0)
class Barrier:
    """Counts the detector actors that reached it."""

    def __init__(self):
        self.arrived = 0

    def arrive(self) -> None:
        self.arrived += 1

    def count(self) -> int:
        return self.arrived


class BarrierDetector(Detector):
    """The app's detector, loading its model only once ACTORS actors have reached the barrier (the named
    actor BARRIER): none of the run's images is detected before the last actor is up, however long the
    autoscaler takes to start their nodes (after 300 s it goes on, for the test to say what was missing)."""

    def load_model(self, spec):
        barrier = ray.get_actor(BARRIER)
        ray.get(barrier.arrive.remote())
        deadline = time.monotonic() + 300
        while ray.get(barrier.count.remote()) < ACTORS and time.monotonic() < deadline:
            time.sleep(0.2)
        return super().load_model(spec)


def write_fake_provider_defaults() -> None:
    """Ray's wheel lacks the fake provider's defaults file, which AutoscalingCluster reads before it
    applies its own settings; write one with the keys a cluster config must have."""
    path = Path(ray.__file__).parent / "autoscaler/_private/fake_multi_node/example.yaml"
    if path.exists():
        return
    defaults = {
        "cluster_name": "fake_multinode",
        "max_workers": 4,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 1,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True},
        "auth": {"ssh_user": "ubuntu"},
        "docker": {},
        "head_node_type": "ray.head.default",
        "available_node_types": {},
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }
    path.write_text(yaml.safe_dump(defaults))


@pytest.fixture(scope="module")
def autoscaling_cluster(monkeypatch_module):
    write_fake_provider_defaults()
    # `ray start` and `ray stop` run as commands: the ones installed beside this Python.
    monkeypatch_module.setenv("PATH", f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}")
    cluster = AutoscalingCluster(
        head_resources={"CPU": 2},
        worker_node_types={"gpu": {"resources": {"CPU": 1, "GPU": 1}, "node_config": {}, "min_workers": 0, "max_workers": 2}},
        autoscaler_v2=True,
        idle_timeout_minutes=IDLE_TIMEOUT_S / 60,
    )
    cluster.start()
    ray.init(address="auto", log_to_driver=False)  # this test's own connection, for the state API
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def alive_gpu_nodes() -> list[str]:
    return [node.node_id for node in list_nodes(limit=100) if node.state == "ALIVE" and node.resources_total.get("GPU")]


def detector_actor_nodes(earlier_actors: set[str]) -> list[str]:
    """The nodes of the detector actors that did not exist before the run (Ray's state API)."""
    actors = list_actors(limit=1000, detail=True)
    return sorted(a.node_id for a in actors if "Detector" in a.class_name and a.actor_id not in earlier_actors)


def test_a_run_grows_onto_every_gpu_the_cluster_may_add_and_gives_them_back(autoscaling_cluster, tmp_path, monkeypatch):
    """From no GPU node up, the run asks for a GPU actor per GPU the cluster may add; the autoscaler starts
    a node for each, and each actor detects some of the images (BarrierDetector holds them back until
    every actor is up)."""
    write_images(tmp_path / "in", 16)
    monkeypatch.setenv("RAY_DETECT_MAX_GPUS", str(ACTORS))
    overrides = [*FAST_MODEL, "ray.address=auto", "inference.num_actors=auto", "inference.cpu_fallback=true", "inference.batch_size=2",
                 f"data.path={tmp_path / 'in'}", f"output.path={tmp_path / 'out'}"]
    assert alive_gpu_nodes() == []
    barrier = Barrier.options(name=BARRIER).remote()
    summary = run(compose_config(overrides), detector=BarrierDetector)
    assert ray.get(barrier.count.remote()) == ACTORS
    assert (summary.inputs, summary.ok, summary.errors) == (16, 16, 0)
    assert (summary.detector_actors, summary.detector_nodes, summary.detector_gpus) == (ACTORS, ACTORS, float(ACTORS))
    # Both actors made rows (the summary counts the actors and nodes its rows came from), on two GPU nodes.
    gpu_nodes = {node.node_id for node in list_nodes(limit=100) if node.resources_total.get("GPU")}
    actor_nodes = detector_actor_nodes(set())
    assert len(set(actor_nodes)) == ACTORS and set(actor_nodes) <= gpu_nodes
    # Nothing holds the GPU nodes once the run is over: the autoscaler removes them when idle.
    deadline = time.monotonic() + IDLE_TIMEOUT_S + 60
    while alive_gpu_nodes() and time.monotonic() < deadline:
        time.sleep(2)
    assert alive_gpu_nodes() == []


def test_without_the_hint_auto_stays_on_the_cpus_that_are_up(autoscaling_cluster, tmp_path, monkeypatch):
    """What the README says: with no RAY_DETECT_MAX_GPUS and no GPU up, inference.num_gpus=auto runs the
    detector on the CPUs that are up (the head's), and no GPU node is started."""
    write_images(tmp_path / "in", 12)
    monkeypatch.delenv("RAY_DETECT_MAX_GPUS", raising=False)
    earlier = {a.actor_id for a in list_actors(limit=1000)}
    cfg = compose_config([*FAST_MODEL, "ray.address=auto", "inference.num_actors=auto", f"data.path={tmp_path / 'in'}", f"output.path={tmp_path / 'out'}"])
    summary = run(cfg)
    assert (summary.ok, summary.detector_gpus) == (12, 0.0)
    head = next(node.node_id for node in list_nodes(limit=100) if node.is_head_node)
    assert set(detector_actor_nodes(earlier)) == {head}
    assert alive_gpu_nodes() == []


def test_a_run_that_finds_nothing_new_asks_for_no_gpu(autoscaling_cluster, tmp_path, monkeypatch):
    """A scheduled run that finds nothing new, on inputs streamed by Ray tasks (a manifest): it ends before
    its detector stage, so no actor asks the autoscaler for one of the GPUs RAY_DETECT_MAX_GPUS says it may
    add, and no node is added. (The first run detects on CPUs: inference.num_gpus is not one of the
    settings a resume compares.)"""
    images = write_images(tmp_path / "in", 8)
    manifest = tmp_path / "images.parquet"
    pq.write_table(pa.table({"path": [str(path) for path in images]}), manifest)
    overrides = [*FAST_MODEL, "ray.address=auto", f"data.manifest={manifest}", "data.path=/nonexistent", f"output.path={tmp_path / 'out'}"]
    monkeypatch.delenv("RAY_DETECT_MAX_GPUS", raising=False)
    assert run(compose_config([*overrides, "inference.num_gpus=0"])).ok == 8

    monkeypatch.setenv("RAY_DETECT_MAX_GPUS", str(ACTORS))
    earlier = {a.actor_id for a in list_actors(limit=1000)}
    nodes = {node.node_id for node in list_nodes(limit=100)}
    again = run(compose_config(overrides))
    assert (again.inputs, again.processed, again.detector_actors) == (8, 0, 0)
    assert detector_actor_nodes(earlier) == []
    assert {node.node_id for node in list_nodes(limit=100)} == nodes
