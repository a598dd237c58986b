"""Planning a run (app/plan.py): plain arithmetic on the config and the cluster's resources, no Ray."""

import pytest

from app.plan import MODEL_BATCHES_PER_SHAPE, SHAPE_BUCKETS, ClusterLimits, Plan, Resources, plan_run
from app.config import compose_config
from tests.support.models import FAST_MODEL

# The tests' model at the app's default pool size (auto), which is what is planned here.
MODEL = [*FAST_MODEL, "inference.num_actors=auto"]

CPU_NODE = [{"CPU": 2.0}]
# A decode task's base, 16 images at model size, and the largest file allowed (64 MiB) with its 40 million
# pixels at 8 bytes each while it is decoded.
DECODE_MEMORY = 256 * 1024**2 + 16 * 320 * 640 * 3 + 64 * 1024**2 + 8 * 40_000_000


@pytest.mark.parametrize("files, actors, block_rows", [(1, 1, 4), (3, 1, 4), (5, 2, 4), (40, 2, 5)])
def test_no_more_actors_or_decode_tasks_than_blocks(files, actors, block_rows):
    """A block goes to one decode task and one actor: a small input gets no idle ones (and Ray Data no
    pool larger than its inputs, which it warns of)."""
    plan = plan_run(compose_config(["data.path=x", "output.path=y", *MODEL]), CPU_NODE, True, ClusterLimits(), files)
    assert plan == Plan(
        resources=Resources(num_gpus=0.0, num_actors=actors, num_cpus_per_actor=1.0, decode_cpus=0.0, decode_tasks=actors),
        batch_size=4, block_rows=block_rows, rows_per_call=block_rows if block_rows > 4 else 4, decode_batch=block_rows,
        decode_memory=DECODE_MEMORY, input_tasks=actors, calls_per_actor=1 if actors > 1 else 2,
    )


def test_a_gpu_cluster_with_two_files_gets_one_actor_and_one_decode_task():
    cfg = compose_config(["data.path=x", "output.path=y", *MODEL])
    plan = plan_run(cfg, [{"CPU": 16.0, "GPU": 4.0}], True, ClusterLimits(), 2)
    assert plan.resources == Resources(num_gpus=1.0, num_actors=1, num_cpus_per_actor=1.0, decode_cpus=1.0, decode_tasks=1)
    assert (plan.batch_size, plan.block_rows, plan.calls_per_actor) == (32, 16, 2)
    assert plan_run(cfg, [{"CPU": 16.0, "GPU": 4.0}], True, ClusterLimits(), 1000).resources == Resources(
        num_gpus=1.0, num_actors=4, num_cpus_per_actor=1.0, decode_cpus=1.0, decode_tasks=12)


def test_streamed_inputs_keep_the_whole_pool_and_a_cpu_for_the_input_stage():
    cfg = compose_config(["data.path=x", "output.path=y", *MODEL])
    plan = plan_run(cfg, [{"CPU": 8.0}], True, ClusterLimits(), None)
    # 8 CPUs: actors of 4 threads, one fewer than the two that would fit, for the repartition's CPU;
    # decode tasks take the CPUs left, as many as those allow, and input tasks INPUT_TASKS at once.
    assert plan.resources == Resources(num_gpus=0.0, num_actors=1, num_cpus_per_actor=4.0, decode_cpus=1.0, decode_tasks=None)
    assert (plan.block_rows, plan.rows_per_call, plan.decode_batch, plan.input_tasks) == (1024, 96, 16, 4)


def test_a_call_holds_model_batches_of_each_shape_in_whole_blocks():
    """1,500 listed files on one GPU actor at batch 8: blocks of 16 files decoded each by a task, bundled
    by Ray Data into calls of 12 blocks, 6 model batches for each of 4 shapes (the issue's 16-image calls
    made model batches of 5.3 images on average)."""
    cfg = compose_config(["data.path=x", "output.path=y", *MODEL, "inference.batch_size=8"])
    plan = plan_run(cfg, [{"CPU": 16.0, "GPU": 1.0}], True, ClusterLimits(), 1500)
    assert (plan.batch_size, plan.block_rows, plan.rows_per_call, plan.decode_batch) == (8, 16, 192, 16)
    assert plan.rows_per_call == 8 * SHAPE_BUCKETS * MODEL_BATCHES_PER_SHAPE


def test_a_calibrating_run_sizes_its_calls_for_the_largest_batch_size_its_actors_may_choose():
    """inference.calibrate_batch_size: the ceiling is inference.batch_size, or the model's default on the
    device times 4 (the light model's 32 on a GPU: 128); calls are sized for it, within CALL_BYTES (873
    images at 320 x 640, in 44 blocks of 20)."""
    gpu = [{"CPU": 16.0, "GPU": 1.0}]
    calibrating = compose_config(["data.path=x", "output.path=y", *MODEL, "inference.calibrate_batch_size=true"])
    plan = plan_run(calibrating, gpu, True, ClusterLimits(), 10_000)
    assert (plan.batch_size, plan.block_rows, plan.rows_per_call) == (128, 20, 44 * 20)
    assert plan_run(calibrating, CPU_NODE, True, ClusterLimits(), 10_000).batch_size == 16
    capped = compose_config(["data.path=x", "output.path=y", *MODEL, "inference.calibrate_batch_size=true", "inference.batch_size=16"])
    assert plan_run(capped, gpu, True, ClusterLimits(), 10_000).batch_size == 16


@pytest.mark.parametrize("cpus, threads", [(2.0, 1.0), (8.0, 7.0)])
def test_a_fixed_pool_on_streamed_inputs_leaves_the_input_stage_its_cpu(cpus, threads):
    """inference.num_actors=1 on streamed inputs: the actor's threads stop one CPU short of the node, the
    repartition's (taking them all, it would wait for that CPU while the actor waits for its inputs)."""
    cfg = compose_config(["data.path=x", "output.path=y", *FAST_MODEL])
    assert plan_run(cfg, [{"CPU": cpus}], True, ClusterLimits(), None).resources.num_cpus_per_actor == threads
    assert plan_run(cfg, [{"CPU": cpus}], True, ClusterLimits(), 1000).resources.num_cpus_per_actor == cpus


def test_a_tiled_run_spreads_scenes_over_the_actors_one_per_call():
    """With tiling a scene is many model batches: two scenes go to two actors in blocks of one, each
    decode call takes one file, each actor call one scene, and a decode task declares a scene of
    data.max_image_pixels (250 million with tiling) at 3 bytes a pixel beside the largest file's decode."""
    cfg = compose_config(["data.path=x", "output.path=y", *MODEL, "tiling=tiles"])
    plan = plan_run(cfg, CPU_NODE, True, ClusterLimits(), 2)
    assert (plan.resources.num_actors, plan.block_rows, plan.rows_per_call, plan.decode_batch) == (2, 1, 1, 1)
    assert plan.decode_memory == 256 * 1024**2 + (320 * 640 * 3 + 3 * 250_000_000) + 256 * 1024**2 + 8 * 250_000_000
    assert plan_run(cfg, CPU_NODE, True, ClusterLimits(), 1000).block_rows == 16
    assert plan_run(cfg, CPU_NODE, True, ClusterLimits(), None).block_rows == 64
