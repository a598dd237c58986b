"""A real multi-node Ray cluster on this machine, with the test process as its driver."""

import contextlib


@contextlib.contextmanager
def connected_cluster(head_cpus: int, *workers: dict):
    """A real multi-node Ray cluster on this machine (ray.cluster_utils.Cluster), with this process
    connected as its driver; yields the cluster and its worker nodes. The head runs the dashboard, for
    the state API (where tasks and actors ran)."""
    import ray
    from ray.cluster_utils import Cluster

    store = 200 * 1024**2
    cluster = Cluster(initialize_head=True, head_node_args=dict(num_cpus=head_cpus, include_dashboard=True, object_store_memory=store))
    nodes = [cluster.add_node(object_store_memory=store, **resources) for resources in workers]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        yield cluster, nodes
    finally:
        ray.shutdown()
        cluster.shutdown()
