"""Planning a run: what the detector stage asks Ray for, how inputs are cut into blocks, and how many
images go to each call. Plain arithmetic on the config and the cluster's resources: no Ray, no torch.
The parts that size one resource take their section (plan_resources the inference section,
model_batch_size the inference and model sections); plan_run and the decode task's sizes take the whole
config, as they weigh four of its sections (inference, model, data, tiling) against each other."""

import logging
import math
import os
from dataclasses import dataclass, replace
from typing import Optional

from app.calibration import CEILING_FACTOR
from app.config import AUTO, AppConfig, ConfigError, InferenceConfig, ModelConfig, parse_number

log = logging.getLogger(__name__)

# Files decoded per call of the decode function: its memory is declared for this many images.
FILES_PER_DECODE_BATCH = 16
# Input blocks per detector actor, at least, so that every actor gets work (a block goes to one actor).
BLOCKS_PER_ACTOR = 4
# Input blocks, at most: building the dataset costs about 5 ms a block on a 2-core machine.
MAX_INPUT_BLOCKS = 500
# Files per input block when Ray tasks list the inputs (their number is not known in advance). The
# driver keeps about 3 KB per block it has seen (Ray Data's bookkeeping): 64-file blocks made its memory
# grow by 400 MB from 1 to 10 million inputs, 1,024-file blocks keep it flat.
STREAMED_BLOCK_FILES = 1024
# The same with tiling: a scene is about a hundred model inputs, and a block goes to one actor, so that
# blocks of 1,024 scenes would leave one actor working for long after the others ran out; 64 still grows
# the driver by under 50 MB a million scenes.
STREAMED_TILED_BLOCK_FILES = 64
# Tasks listing inputs or reading a manifest at once, when decode tasks are bounded by CPUs alone.
INPUT_TASKS = 4
# Blocks the parts of a large tree are cut into, at most (a block is listed by one task).
MAX_LISTING_BLOCKS = 256
# torch threads per detector actor on CPU, at most: more, smaller actors keep more cores busy.
MAX_CPU_THREADS_PER_ACTOR = 4
# Images per model call when inference.batch_size is null, by model, on CPU and on GPU. On a CPU the
# heavy models gain nothing from batching (measured: see docs/benchmark.md); on a GPU batches keep it busy (the
# sizes the models alone were measured at on an H100: benchmarks/gpu-h100-2026-11-27.txt).
DEFAULT_BATCH_SIZES = {
    "fasterrcnn_resnet50_fpn_v2": {"cpu": 1, "gpu": 8},
    "fasterrcnn_resnet50_fpn": {"cpu": 1, "gpu": 8},
    "fasterrcnn_mobilenet_v3_large_fpn": {"cpu": 2, "gpu": 16},
    "fasterrcnn_mobilenet_v3_large_320_fpn": {"cpu": 4, "gpu": 32},
}
# A detector actor's call holds model batches of each shape it may meet: the images of a call are grouped
# by shape into model batches (app.detector.shape_batches: landscape, portrait, square and panoramic photos
# each pad too much beside the others), and each shape's last batch of the call is the one left part-full.
# A call of 24 model batches' images (6 per shape) fills them: replaying 1,500 VOC-like images (60%
# landscape, 30% portrait, 10% square and panoramic) at batch 8, calls of 16 images made batches of 5.5
# images on average, calls of 64 of 7.1, of 128 of 7.5, of 192 of 7.7 (96%); tests/test_batches.py
# checks at least 90% through a whole run. Leftovers are not carried to the next call instead: Ray Data
# tells a call's function nothing of the end of its inputs, so images held back for a next call that
# never comes would get no row, and images held by an actor that dies would be lost with it, while a
# call's rows are retried with the call. Each call's rows are its own images, one row each.
SHAPE_BUCKETS = 4
MODEL_BATCHES_PER_SHAPE = 6
# Images per call when a model batch is one image, full whatever its shape: small calls keep the rows of a
# model that takes a second an image on a CPU flowing to the driver.
UNBATCHED_CALL_ROWS = 4
# A call's decoded images, at most (about): an actor holds its call, and on a GPU the next one, in its node's
# object store, which the chart sizes from /dev/shm (4Gi on a GPU worker by default). 192 images at 800 x
# 1,333 px are 614 MB; 12 MP photos not resized on the CPU (36 MB each) are 14 to a call.
CALL_BYTES = 512 * 1024**2
# Set by the chart on the head: the GPUs and CPUs the cluster's worker groups may grow to.
MAX_GPUS_VARIABLE = "RAY_DETECT_MAX_GPUS"
MAX_CPUS_VARIABLE = "RAY_DETECT_MAX_CPUS"
# A decode worker's own memory (Python, pyarrow, Pillow) before any image, as Ray Data measures it.
DECODE_TASK_BASE_MEMORY = 256 * 1024**2
# Memory a decode takes a pixel of its image, at most: two full-size images at once, of 4 bytes a pixel
# (Pillow keeps RGB, RGBA, CMYK and 32-bit grayscale in 4): the image and its RGB conversion or its
# EXIF turn; each step frees the image before it (app.decode.to_rgb). A 16-bit grayscale PNG takes
# under 4 (tests/test_decode.py). A tiled scene: the image and its RGB bytes (3) at once, under 8 in all
# (tests/test_tiling.py).
DECODE_BYTES_PER_PIXEL = 8



@dataclass(frozen=True)
class Resources:
    """What the detector stage asks Ray for, with "auto" resolved against the cluster."""

    num_gpus: float
    num_actors: int
    num_cpus_per_actor: float
    decode_cpus: float = 1.0  # CPUs each decode task reserves
    decode_tasks: Optional[int] = None  # decode tasks running at once, at most (None: as CPUs allow)



@dataclass(frozen=True)
class ClusterLimits:
    """What an autoscaling cluster may grow to, as its deployment says (open-source Ray does not tell a
    job its autoscaler's limits): the chart sets RAY_DETECT_MAX_GPUS and RAY_DETECT_MAX_CPUS on the head,
    where a RayJob's entrypoint runs. None: not said."""

    max_gpus: Optional[float] = None
    max_cpus: Optional[float] = None

    @classmethod
    def from_environment(cls, environ=os.environ) -> "ClusterLimits":
        def read(variable: str) -> Optional[float]:
            text = environ.get(variable, "").strip()
            if not text:
                return None
            try:
                number = float(text)
            except ValueError:
                number = math.nan
            if not number >= 0:  # NaN included
                raise ConfigError(f"{variable}={text!r} (set by the deployment) must be a number, at least 0")
            return number

        return cls(max_gpus=read(MAX_GPUS_VARIABLE), max_cpus=read(MAX_CPUS_VARIABLE))


def plan_resources(
    inference: InferenceConfig, nodes: list[dict[str, float]], local: bool = True, limits: ClusterLimits = ClusterLimits(),
    input_cpus: float = 0.0,
) -> Resources:
    """Resolve the "auto" settings of the detector stage against the resources of the cluster's nodes,
    and, on an attached cluster, against what its autoscaler may add (`limits`).

    On CPU a node runs at least two actors, each with up to MAX_CPU_THREADS_PER_ACTOR CPUs and as many
    torch threads, and the actors take every CPU: torch's threads speed up a forward pass less than
    linearly, while separate actors add up almost linearly (on 2 cores, two 1-thread actors do 1.1x
    the images of one 2-thread actor). Decoding an image costs a few percent of a forward pass, so
    decode tasks reserve no CPU then and run one per actor at a time.
    With a GPU, an actor takes one CPU and decode tasks one CPU each, on the CPUs the actors leave.
    A cluster that may grow to N GPUs gets N GPU actors from the start (N x inference.actors_per_gpu, each
    with that share of a GPU), even with no GPU up yet: the actors still waiting for a GPU make the
    autoscaler add GPU nodes.

    A local Ray instance cannot grow, so asking it for GPUs it lacks is a config error; an attached
    cluster may still add GPU nodes through its autoscaler, so there it is only a warning.
    `input_cpus` are left to the input stage: CPU actors that would take them are one fewer.
    """
    cluster_gpus = sum(node.get("GPU", 0.0) for node in nodes)
    cluster_cpus = sum(node.get("CPU", 0.0) for node in nodes)
    largest_node_cpus = max((node.get("CPU", 0.0) for node in nodes), default=1.0)
    reachable_gpus, reachable_cpus = cluster_gpus, cluster_cpus
    if not local:
        reachable_gpus = max(cluster_gpus, limits.max_gpus or 0.0)
        reachable_cpus = max(cluster_cpus, limits.max_cpus or 0.0)
    sharing = inference.actors_per_gpu
    if inference.num_gpus == AUTO:
        num_gpus = 1.0 / sharing if reachable_gpus > 0 else 0.0
    else:
        num_gpus = parse_number("inference.num_gpus", inference.num_gpus, 0)
        if sharing > 1:
            if num_gpus != 1:
                raise ConfigError(f"inference.actors_per_gpu={sharing} shares whole GPUs: it needs inference.num_gpus=auto "
                                  f"or 1, not {inference.num_gpus}")
            num_gpus = 1.0 / sharing
        if num_gpus > 0 and cluster_gpus == 0:
            message = f"inference.num_gpus={inference.num_gpus} but the Ray cluster has no GPUs"
            if local:
                raise ConfigError(message)
            log.warning("%s yet; waiting for its autoscaler to add GPU nodes", message)
    fixed_actors = None if inference.num_actors == AUTO else int(parse_number("inference.num_actors", inference.num_actors, 1))
    if inference.num_cpus_per_actor != AUTO:
        num_cpus = parse_number("inference.num_cpus_per_actor", inference.num_cpus_per_actor, 0)
    elif num_gpus:
        num_cpus = 1.0  # one CPU feeds a GPU
    elif fixed_actors:
        # A given number of actors shares the cluster's CPUs, less those of the input stage.
        num_cpus = max(1.0, min(largest_node_cpus, (cluster_cpus - input_cpus) // fixed_actors))
    else:
        num_cpus = float(max(1, min(MAX_CPU_THREADS_PER_ACTOR, int(largest_node_cpus) // 2)))
    if fixed_actors:
        num_actors = fixed_actors
    elif num_gpus:
        # Rounded: a third of a GPU is not exactly a third in floating point.
        num_actors = max(1, math.floor(reachable_gpus / num_gpus + 1e-6))
    else:
        fitting = sum(int(node.get("CPU", 0.0) // num_cpus) for node in nodes)
        num_actors = max(1, fitting, int((reachable_cpus - cluster_cpus) // num_cpus) + fitting)
        if num_actors * num_cpus > reachable_cpus - input_cpus:
            num_actors = max(1, num_actors - math.ceil(input_cpus / num_cpus))
    if not fixed_actors and inference.max_actors is not None:
        num_actors = min(num_actors, inference.max_actors)
    if num_gpus and num_actors * num_cpus <= reachable_cpus - 1 - input_cpus:
        # Decode tasks stop short of the CPUs the actors (and the input stage) need, so that no actor
        # waits for a CPU while decode tasks fill the node, and the device starts with the first images.
        return Resources(num_gpus, num_actors, num_cpus, decode_tasks=int(reachable_cpus - num_actors * num_cpus - input_cpus))
    if num_actors * num_cpus > reachable_cpus - 1 - input_cpus:
        # The actors take every CPU: decode tasks reserve none and run one per actor at a time, which
        # keeps the actors fed without a crowd of decode workers starting up beside them.
        return Resources(num_gpus, num_actors, num_cpus, decode_cpus=0.0, decode_tasks=num_actors)
    return Resources(num_gpus=num_gpus, num_actors=num_actors, num_cpus_per_actor=num_cpus)


def files_per_block(num_files: int, num_actors: int, batch_size: int) -> int:
    """Files per input block; a block is decoded by one task and its images go to one detector actor.

    A small input is cut into BLOCKS_PER_ACTOR blocks per actor (none smaller than a model batch), so
    that every actor gets work; a large one into blocks of FILES_PER_DECODE_BATCH files, or into
    MAX_INPUT_BLOCKS larger ones, whose decode tasks stream their images out batch by batch."""
    balanced = max(batch_size, math.ceil(num_files / (BLOCKS_PER_ACTOR * num_actors)))
    return max(1, min(FILES_PER_DECODE_BATCH, balanced), math.ceil(num_files / MAX_INPUT_BLOCKS))


def model_batch_size(inference: InferenceConfig, model: ModelConfig, resources: Resources) -> int:
    """inference.batch_size, or the model's default on the device the actors run on. With
    inference.calibrate_batch_size, the largest the actors may choose: calls are sized for it."""
    if inference.batch_size is not None:
        return inference.batch_size
    default = DEFAULT_BATCH_SIZES[model.name]["gpu" if resources.num_gpus else "cpu"]
    return default * CEILING_FACTOR if inference.calibrate_batch_size else default


def rows_per_call(block_rows: int, batch_size: int, listed_files: Optional[int] = None, num_actors: int = 1,
                  image_bytes: Optional[int] = None) -> int:
    """Images per call of a detector actor: MODEL_BATCHES_PER_SHAPE model batches of each of SHAPE_BUCKETS
    shapes, so that shape batching fills the model batch (UNBATCHED_CALL_ROWS when a model batch is one
    image). A block larger than that is cut into calls of it by the actor's task; smaller
    blocks are bundled whole into a call (Ray Data bundles whole blocks up to the call's size, so the call
    is a multiple of the block, not cut into a full call and a small remainder). A listed input still
    gives each actor BLOCKS_PER_ACTOR calls, so a small one reaches every actor; and a call is never
    less than a model batch. With `image_bytes` (a decoded image's, at most), a call holds about CALL_BYTES.
    """
    if batch_size == 1:
        return min(block_rows, UNBATCHED_CALL_ROWS)
    full = batch_size * SHAPE_BUCKETS * MODEL_BATCHES_PER_SHAPE
    if image_bytes:
        full = min(full, max(batch_size, CALL_BYTES // image_bytes))
    if block_rows >= full:
        return full
    blocks = math.ceil(full / block_rows)
    if listed_files is not None:
        blocks = min(blocks, listed_files // (BLOCKS_PER_ACTOR * num_actors * block_rows))
    return block_rows * max(blocks, math.ceil(batch_size / block_rows))


def decoded_image_bytes(cfg: AppConfig) -> int:
    """Upper bound of one decoded row's pixels: the image at model size (a 12 MP photo when not
    resizing); with tiling, also a scene of data.max_image_pixels at full size."""
    if cfg.inference.resize_on_cpu:
        whole = cfg.model.min_size * cfg.model.max_size * 3
    else:
        whole = 12_000_000 * 3
    return whole + (3 * cfg.data.max_image_pixels if cfg.tiling.enabled else 0)


def files_per_decode_call(cfg: AppConfig) -> int:
    """Files decoded per call of the decode function; with tiling one, each call's row a whole scene."""
    return 1 if cfg.tiling.enabled else FILES_PER_DECODE_BATCH


def decode_task_memory(cfg: AppConfig) -> int:
    """What a decode task may hold at once: the worker's own memory, the images it decoded so far in
    this call, and the largest file allowed while it is decoded (its bytes, and its pixels through the
    decode's steps, DECODE_BYTES_PER_PIXEL)."""
    largest = cfg.data.max_file_bytes + DECODE_BYTES_PER_PIXEL * cfg.data.max_image_pixels
    return DECODE_TASK_BASE_MEMORY + files_per_decode_call(cfg) * decoded_image_bytes(cfg) + largest


@dataclass(frozen=True)
class Plan:
    """How a run maps its stages onto the cluster."""

    resources: Resources
    batch_size: int  # images per model call
    block_rows: int  # files per input block
    rows_per_call: int  # images per call of a detector actor
    decode_batch: int  # files per call of the decode function
    decode_memory: int  # bytes a decode task declares to Ray
    input_tasks: int  # tasks listing, reading or filtering streamed inputs at once
    # Calls queued per detector actor. A CPU actor takes seconds per call: it is handed its next block
    # only when free, so that no block waits in one actor's queue while another actor idles. A GPU actor
    # (or a lone actor, whose queue nothing else could take from) gets its next block while it computes,
    # to have it at hand.
    calls_per_actor: int


def plan_run(cfg: AppConfig, nodes: list[dict[str, float]], local: bool, limits: ClusterLimits,
             listed_files: Optional[int]) -> Plan:
    """The plan for the cluster's `nodes`. `listed_files` is the number of files to process when the
    driver listed them; None when Ray tasks stream the inputs, which are then cut into blocks by Ray
    Data's streaming repartition, a task that takes a CPU (plan_resources leaves it one)."""
    streamed = listed_files is None
    resources = plan_resources(cfg.inference, nodes, local, limits, input_cpus=1.0 if streamed else 0.0)
    batch = model_batch_size(cfg.inference, cfg.model, resources)
    tiled = cfg.tiling.enabled
    if streamed:
        block_rows = STREAMED_TILED_BLOCK_FILES if tiled else STREAMED_BLOCK_FILES
    else:
        # A tiled scene fills model batches by itself: blocks as small as one scene spread them over the actors.
        block_rows = files_per_block(listed_files, resources.num_actors, 1 if tiled else batch)
    if not streamed:
        # A block goes to one decode task and one actor: no more of either than there are blocks (more
        # would idle, and Ray Data warns of a pool larger than its inputs).
        blocks = math.ceil(listed_files / block_rows)
        resources = replace(
            resources,
            num_actors=min(resources.num_actors, blocks),
            decode_tasks=min(resources.decode_tasks, blocks) if resources.decode_tasks else None,
        )
    return Plan(
        resources=resources,
        batch_size=batch,
        block_rows=block_rows,
        # A tiled scene is many model batches by itself, and a call of one row takes its block as it is:
        # rows of several scenes would be copied into one batch.
        rows_per_call=1 if cfg.tiling.enabled else rows_per_call(block_rows, batch, listed_files, resources.num_actors,
                                                                      decoded_image_bytes(cfg)),
        decode_batch=min(block_rows, files_per_decode_call(cfg)),
        # The decode task's memory, declared so Ray can plan it. As the detector declares none, this also
        # keeps Ray from fusing decoding into the actors, where it would run serially with the model.
        decode_memory=decode_task_memory(cfg),
        input_tasks=resources.decode_tasks or INPUT_TASKS,
        calls_per_actor=2 if resources.num_gpus or resources.num_actors == 1 else 1,
    )


def on_driver_node():
    """Where a run's bookkeeping actors live (the retry budget, the input tally): the driver's node, the
    head in a RayJob, which is never a spot node that a preemption takes away with their counts."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
