"""The batch job: list inputs → read bytes and decode (CPU tasks) → detect (actor pool) → commit Parquet."""

import logging
import math
import os
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import ray
import torch
import torchvision
from omegaconf import OmegaConf

import app
from app import inventory, listing, resume, storage
from app.config import SAMPLES_DIR, AppConfig, InferenceConfig
from app.decode import DecodeOptions, decode_images
from app.detector import DEVICE_ERROR_MARKER, WORKER_COLUMN, Detector
from app.lease import LEASE_NAME, OutputLease
from app.model import MODEL_NAMES, ModelSpec, WeightsError, resolve_weights
from app.results import (
    MANIFEST_NAME,
    SETTINGS_NAME,
    STAGING_DIR,
    ResultWriter,
    read_committed,
    read_json,
    write_json,
)

log = logging.getLogger("app")

AUTO = "auto"
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
# Tasks listing inputs or reading a manifest at once, when decode tasks are bounded by CPUs alone.
INPUT_TASKS = 4
# Blocks the parts of a large tree are cut into, at most (a block is listed by one task).
MAX_LISTING_BLOCKS = 256
# torch threads per detector actor on CPU, at most: more, smaller actors keep more cores busy.
MAX_CPU_THREADS_PER_ACTOR = 4
# Images per model call when inference.batch_size is null, by model, on CPU and on GPU. On a CPU the
# heavy models gain nothing from batching (measured: see the README); on a GPU batches keep it busy (the
# sizes the accelerator issue measured the models alone at on an H100; not measured here).
DEFAULT_BATCH_SIZES = {
    "fasterrcnn_resnet50_fpn_v2": {"cpu": 1, "gpu": 8},
    "fasterrcnn_resnet50_fpn": {"cpu": 1, "gpu": 8},
    "fasterrcnn_mobilenet_v3_large_fpn": {"cpu": 2, "gpu": 16},
    "fasterrcnn_mobilenet_v3_large_320_fpn": {"cpu": 4, "gpu": 32},
}
# Model batches per call of a detector actor, at most: the images of a call are grouped by shape
# into model batches, and the more there are to choose from, the less a batch pads.
MODEL_BATCHES_PER_CALL = 4
# Set by the chart on the head: the GPUs and CPUs the cluster's worker groups may grow to.
MAX_GPUS_VARIABLE = "RAY_DETECT_MAX_GPUS"
MAX_CPUS_VARIABLE = "RAY_DETECT_MAX_CPUS"
# A decode worker's own memory (Python, pyarrow, Pillow) before any image, as Ray Data measures it.
DECODE_TASK_BASE_MEMORY = 256 * 1024**2


class ConfigError(Exception):
    """A configuration mistake, found before any work starts; the message is one line."""


class DeviceUnavailable(Exception):
    """A detector actor holds a GPU that torch cannot use (and inference.cpu_fallback is off); the
    message is one line, from the actor."""


def device_error_in(error: BaseException) -> Optional[str]:
    """The detector's DeviceError message inside an error Ray raised on the driver, if there is one."""
    for line in str(error).splitlines():
        if DEVICE_ERROR_MARKER in line:
            return line[line.index(DEVICE_ERROR_MARKER) + len(DEVICE_ERROR_MARKER):].strip()
    return None


class TooManyErrors(Exception):
    """More than data.max_error_fraction of the images failed; raised after every row is written."""

    def __init__(self, summary: "Summary", max_fraction: float):
        super().__init__(
            f"{summary.errors} of {summary.inputs} images failed, over data.max_error_fraction={max_fraction}"
        )
        self.summary = summary


@dataclass(frozen=True)
class Resources:
    """What the detector stage asks Ray for, with "auto" resolved against the cluster."""

    num_gpus: float
    num_actors: int
    num_cpus_per_actor: float
    decode_cpus: float = 1.0  # CPUs each decode task reserves
    decode_tasks: Optional[int] = None  # decode tasks running at once, at most (None: as CPUs allow)


@dataclass
class Summary:
    """What a run did; also the counts in the manifest."""

    output_path: str
    inputs: int
    processed: int  # images that went through the model in this run (the rest were already committed)
    ok: int
    errors: int
    detections: int
    errors_by_kind: dict[str, int] = field(default_factory=dict)
    wall_seconds: float = 0.0
    images_per_second: float = 0.0
    weights: str = ""
    warnings: list[str] = field(default_factory=list)
    # The detector actors this run used, the nodes they ran on, the GPUs they held, and their devices
    # (cuda:<GPU model> or cpu: actors).
    detector_actors: int = 0
    detector_nodes: int = 0
    detector_gpus: float = 0.0
    detector_devices: dict[str, int] = field(default_factory=dict)


def parse_number(key: str, value: str, minimum: float) -> float:
    try:
        number = float(value)
    except ValueError:
        raise ConfigError(f"{key}={value!r} must be {AUTO!r} or a number") from None
    if number < minimum or math.isnan(number):
        raise ConfigError(f"{key}={value!r} must be at least {minimum:g}")
    return number


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
    A cluster that may grow to N GPUs gets N GPU actors from the start, even with no GPU up yet: the
    actors still waiting for a GPU make the autoscaler add GPU nodes.

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
    if inference.num_gpus == AUTO:
        num_gpus = 1.0 if reachable_gpus > 0 else 0.0
    else:
        num_gpus = parse_number("inference.num_gpus", inference.num_gpus, 0)
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
        # A given number of actors shares the cluster's CPUs.
        num_cpus = max(1.0, min(largest_node_cpus, cluster_cpus // fixed_actors))
    else:
        num_cpus = float(max(1, min(MAX_CPU_THREADS_PER_ACTOR, int(largest_node_cpus) // 2)))
    if fixed_actors:
        num_actors = fixed_actors
    elif num_gpus:
        num_actors = max(1, int(reachable_gpus // num_gpus))
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


def batch_size(cfg: AppConfig, resources: Resources) -> int:
    """inference.batch_size, or the model's default on the device the actors run on."""
    if cfg.inference.batch_size is not None:
        return cfg.inference.batch_size
    return DEFAULT_BATCH_SIZES[cfg.model.name]["gpu" if resources.num_gpus else "cpu"]


def rows_per_call(block_rows: int, batch_size: int) -> int:
    """Images per call of a detector actor: up to MODEL_BATCHES_PER_CALL model batches to group by shape,
    but no more than a block, so that a small input still reaches every actor."""
    return max(batch_size, min(MODEL_BATCHES_PER_CALL * batch_size, block_rows))


def decoded_image_bytes(cfg: AppConfig) -> int:
    """Upper bound of one decoded image's pixels at model size; a 12 MP photo when not resizing."""
    if cfg.inference.resize_on_cpu:
        return cfg.model.min_size * cfg.model.max_size * 3
    return 12_000_000 * 3


def check_config(cfg: AppConfig) -> None:
    """Value checks the schema's types cannot express."""
    if cfg.model.name not in MODEL_NAMES:
        raise ConfigError(f"model.name={cfg.model.name!r} is not one of {', '.join(MODEL_NAMES)}")
    if cfg.inference.max_actors is not None and cfg.inference.max_actors < 1:
        raise ConfigError(f"inference.max_actors={cfg.inference.max_actors} must be at least 1")
    if cfg.inference.batch_size is not None and cfg.inference.batch_size < 1:
        raise ConfigError(f"inference.batch_size={cfg.inference.batch_size} must be at least 1")
    if cfg.output.rows_per_file < 1:
        raise ConfigError(f"output.rows_per_file={cfg.output.rows_per_file} must be at least 1")
    if not 0 <= cfg.data.max_error_fraction <= 1:
        raise ConfigError(f"data.max_error_fraction={cfg.data.max_error_fraction} must be between 0 and 1")
    if cfg.model.max_detections < 1:
        raise ConfigError(f"model.max_detections={cfg.model.max_detections} must be at least 1")
    if not 0 <= cfg.model.score_threshold <= 1:
        raise ConfigError(f"model.score_threshold={cfg.model.score_threshold} must be between 0 and 1")
    if not 0 < 2 * cfg.output.lease_heartbeat_s <= cfg.output.lease_timeout_s:
        raise ConfigError(
            f"output.lease_heartbeat_s={cfg.output.lease_heartbeat_s} must be above 0 and at most half of "
            f"output.lease_timeout_s={cfg.output.lease_timeout_s}"
        )
    for key in ("num_gpus", "num_actors", "num_cpus_per_actor"):
        value = getattr(cfg.inference, key)
        if value != AUTO:
            parse_number(f"inference.{key}", value, 1 if key == "num_actors" else 0)


@dataclass
class Inputs:
    """The run's inputs: where the images are (`source`), and either their rows, listed by the driver
    before any work (small inputs), or how Ray tasks produce them as the run goes (large trees and
    manifests)."""

    source: storage.Location
    listed: Optional[listing.Listing] = None
    manifest: Optional[inventory.Manifest] = None

    @property
    def table(self) -> Optional[pa.Table]:
        """The input rows, when the driver listed them all."""
        return self.listed.found if self.listed is not None and self.listed.complete else None

    def stream(self, cfg: AppConfig, tasks: int) -> ray.data.Dataset:
        """The input rows as a Ray Dataset, produced by up to `tasks` tasks at a time (needs Ray). Like
        decoding, listing takes no CPU of Ray's accounting, so that it runs beside detector actors that
        hold every CPU."""
        if self.manifest is not None:
            suffixes = listing.image_suffixes(cfg.data.extensions)
            return self.manifest.dataset(tasks).map_batches(
                inventory.manifest_rows, batch_format="pyarrow", num_cpus=0,
                compute=ray.data.TaskPoolStrategy(size=tasks), fn_kwargs=dict(manifest=self.manifest, suffixes=suffixes))
        parts = self.listed.parts
        listed = ray.data.from_items([{"part": part} for part in parts], override_num_blocks=min(len(parts), MAX_LISTING_BLOCKS))
        listed = listed.map_batches(listing.list_part, batch_format="pyarrow", batch_size=1, num_cpus=0,
                                    compute=ray.data.TaskPoolStrategy(size=tasks), fn_kwargs=dict(tree=self.listed.tree))
        if self.listed.found.num_rows:
            listed = ray.data.from_arrow(self.listed.found).union(listed)
        return listed


def plan_inputs(cfg: AppConfig) -> Inputs:
    """Read data.manifest's head, or list data.path as far as the driver lists (app.listing)."""
    try:
        if cfg.data.manifest:
            manifest = inventory.open_manifest(cfg.data.manifest)
            return Inputs(manifest.images, manifest=manifest)
        listed = listing.list_inputs(cfg.data.path, list(cfg.data.extensions))
    except (storage.StorageError, OSError) as error:
        raise ConfigError(str(error)) from None
    if listed.complete and not listed.found.num_rows:
        raise no_images(cfg)
    return Inputs(listed.tree.location, listed=listed)


def streamed_todo(cfg: AppConfig, inputs: Inputs, output: storage.Location, tasks: int) -> tuple[ray.data.Dataset, ray.actor.ActorHandle]:
    """The inputs without a committed row, streamed: listed (or read from the manifest) by tasks, those
    with a row dropped by tasks too (app.resume), cut into blocks of STREAMED_BLOCK_FILES by Ray Data's
    streaming repartition (which takes a CPU: plan_resources left one). Also the tally of all inputs."""
    _, index = resume.scan_output(output, in_ray=True)
    tally = resume.InputTally.remote()
    todo = inputs.stream(cfg, tasks).map_batches(
        resume.drop_done, batch_format="pyarrow", num_cpus=0, compute=ray.data.TaskPoolStrategy(size=tasks),
        fn_kwargs=dict(index=index, uri_prefix=inputs.source.uri_prefix, tally=tally),
    )
    return todo.repartition(target_num_rows_per_block=STREAMED_BLOCK_FILES), tally


def no_images(cfg: AppConfig) -> ConfigError:
    extensions = ", ".join(cfg.data.extensions)
    where = f"data.manifest {cfg.data.manifest} lists" if cfg.data.manifest else f"data.path {cfg.data.path} holds"
    return ConfigError(f"{where} no image files (extensions: {extensions})")


def result_settings(cfg: AppConfig, spec: ModelSpec) -> dict:
    """The settings the result rows depend on: a run resumes an output.path only if they are equal.
    The weights are the ones actually used, so a demo that fell back to random ones is not resumed
    with real ones."""
    model = OmegaConf.to_container(cfg.model, resolve=True)
    model["weights"] = spec.weights
    inputs = {"data.manifest": storage.absolute(cfg.data.manifest)} if cfg.data.manifest else {}
    return {
        **inputs,
        "data.path": storage.absolute(cfg.data.path),
        "data.max_file_bytes": cfg.data.max_file_bytes,
        "data.max_image_pixels": cfg.data.max_image_pixels,
        "inference.resize_on_cpu": cfg.inference.resize_on_cpu,
        "inference.precision": cfg.inference.precision.value,
        **{f"model.{key}": value for key, value in model.items()},
    }


def output_location(cfg: AppConfig) -> storage.Location:
    try:
        output = storage.resolve(cfg.output.path)
        info = output.filesystem.get_file_info(output.path)
    except (storage.StorageError, OSError) as error:
        raise ConfigError(f"output.path {cfg.output.path} cannot be used: {error}") from None
    if info.type == pafs.FileType.File:
        raise ConfigError(f"output.path {cfg.output.path} is a file, not a directory")
    return output


def open_output(cfg: AppConfig, spec: ModelSpec, output: storage.Location) -> None:
    """Prepare output.path, whose lease this run holds: a new dataset, or the resumption of one made with
    the same settings. Files a crashed run left in staging are discarded; committed rows are kept."""
    settings = result_settings(cfg, spec)
    entries = [entry for entry in output.filesystem.get_file_info(pafs.FileSelector(output.path)) if entry.base_name != LEASE_NAME]
    if cfg.output.overwrite:
        for entry in entries:
            if entry.type == pafs.FileType.Directory:
                output.filesystem.delete_dir(entry.path)
            else:
                output.filesystem.delete_file(entry.path)
        entries = []
    previous = read_json(output.filesystem, output.join(SETTINGS_NAME))
    if previous is None and entries:
        raise ConfigError(
            f"output.path {cfg.output.path} holds files that are not ray-detect results; "
            f"choose another output.path or pass output.overwrite=true to replace its contents"
        )
    if previous is not None and previous != settings:
        key = next(key for key in sorted(set(settings) | set(previous)) if settings.get(key) != previous.get(key))
        raise ConfigError(
            f"output.path {cfg.output.path} holds results made with {key}={previous.get(key)!r}, not "
            f"{settings.get(key)!r}; choose another output.path or pass output.overwrite=true to replace them"
        )
    output.filesystem.delete_dir_contents(output.join(STAGING_DIR), missing_dir_ok=True)
    if previous is None:
        write_json(output.filesystem, output.join(SETTINGS_NAME), settings)


def model_spec(cfg: AppConfig) -> ModelSpec:
    spec = ModelSpec(
        name=cfg.model.name,
        weights=str(cfg.model.weights),
        score_threshold=cfg.model.score_threshold,
        max_detections=cfg.model.max_detections,
        min_size=cfg.model.min_size,
        max_size=cfg.model.max_size,
        num_classes=cfg.model.num_classes,
        class_names=tuple(cfg.model.class_names) if cfg.model.class_names else None,
    )
    # Only the embedded demo (the bundled samples) may run without the weights it asked for.
    is_demo = not cfg.data.manifest and storage.resolve(cfg.data.path).path == str(SAMPLES_DIR)
    try:
        return resolve_weights(spec, allow_random_fallback=is_demo)
    except (WeightsError, storage.StorageError) as error:
        raise ConfigError(str(error)) from None


def connect_ray(cfg: AppConfig) -> bool:
    """Attach to the cluster in ray.address or RAY_ADDRESS (as in a RayJob), else start Ray locally.

    Returns whether Ray runs locally (in this process's machine, without an autoscaler)."""
    if cfg.ray.address or os.environ.get("RAY_ADDRESS"):
        if not ray.is_initialized():
            # The actors' and tasks' logs reach the driver's output: in a RayJob, the one log a user reads.
            ray.init(address=cfg.ray.address, log_to_driver=True)
        return False
    if ray.is_initialized():
        return len(ray.nodes()) == 1
    ray.init(num_cpus=cfg.ray.num_cpus, include_dashboard=cfg.ray.include_dashboard, log_to_driver=False)
    return True


def run(cfg: AppConfig, detector: type[Detector] = Detector) -> Summary:
    """Run the batch job described by cfg, or resume it on an output.path that holds part of its results.
    `detector` is the actor class of the detector stage (the benchmark passes one with a stand-in model).

    Raises ConfigError before any work when cfg is wrong, and TooManyErrors after everything is written
    when more than data.max_error_fraction of the images failed.
    """
    started = time.monotonic()
    check_config(cfg)
    inputs = plan_inputs(cfg)
    spec = model_spec(cfg)
    output = output_location(cfg)
    run_id = uuid.uuid4().hex[:12]
    lease = OutputLease(output, run_id, cfg.output.lease_timeout_s, cfg.output.lease_heartbeat_s, cfg.output.lease_wait_s)
    lease.acquire()
    try:
        open_output(cfg, spec, output)
        return run_holding_the_lease(cfg, detector, started, inputs, spec, output, lease)
    finally:
        lease.release()


def run_holding_the_lease(cfg: AppConfig, detector: type[Detector], started: float, inputs: Inputs, spec: ModelSpec,
                          output: storage.Location, lease: OutputLease) -> Summary:
    todo = inputs.table
    if todo is not None:  # small inputs: their rows without a committed row, on the driver
        done = read_committed(output, ["path"]).column("path")
        todo = todo.filter(pc.invert(pc.is_in(pc.binary_join_element_wise(inputs.source.uri_prefix, todo["path"], ""), done)))
        if todo.num_rows == 0 and read_json(output.filesystem, output.join(MANIFEST_NAME)) is not None:
            log.info("every input already has its row in %s: nothing to do", cfg.output.path)
            return check_errors(cfg, summarize(output, inputs.table.num_rows, 0, started, spec))
        log.info("%d of %d images to process from %s", todo.num_rows, inputs.table.num_rows, cfg.data.path)
    else:
        log.info("listing %s in Ray tasks as the run goes", cfg.data.manifest or cfg.data.path)

    workers: set[str] = set()  # the detector actors that made rows, by WORKER_COLUMN
    gpus_per_actor = 0.0
    processed = 0
    tally = None
    if todo is None or todo.num_rows:
        local = connect_ray(cfg)
        nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
        # Streamed inputs are cut into blocks by a Ray Data task that takes a CPU (streamed_todo).
        input_cpus = 0.0 if todo is not None else 1.0
        resources = plan_resources(cfg.inference, nodes, local, ClusterLimits.from_environment(), input_cpus)
        gpus_per_actor = resources.num_gpus
        if spec.fallback_reason:
            log.warning("!" * 80)
            log.warning("DEMO RUNS WITH RANDOM WEIGHTS: its detections are meaningless. %s", spec.fallback_reason)
            log.warning("!" * 80)
        resize = cfg.inference.resize_on_cpu
        decode_options = DecodeOptions(
            max_file_bytes=cfg.data.max_file_bytes,
            max_image_pixels=cfg.data.max_image_pixels,
            min_size=cfg.model.min_size if resize else None,
            max_size=cfg.model.max_size if resize else None,
        )
        model_batch = batch_size(cfg, resources)
        log.info("detector stage: %s, batch size %d", resources, model_batch)
        if todo is not None:
            block_rows = files_per_block(todo.num_rows, resources.num_actors, model_batch)
            images = ray.data.from_arrow([todo.slice(i, block_rows) for i in range(0, todo.num_rows, block_rows)])
        else:
            block_rows = STREAMED_BLOCK_FILES
            images, tally = streamed_todo(cfg, inputs, output, resources.decode_tasks or INPUT_TASKS)
        decoded = images.map_batches(
            decode_images,
            batch_format="pyarrow",
            batch_size=min(block_rows, FILES_PER_DECODE_BATCH),
            fn_kwargs=dict(filesystem=inputs.source.filesystem, uri_prefix=inputs.source.uri_prefix, options=decode_options),
            num_cpus=resources.decode_cpus,
            compute=ray.data.TaskPoolStrategy(size=resources.decode_tasks),
            # The task's memory, declared so Ray can plan it. As the detector declares none, this also
            # keeps Ray from fusing decoding into the actors, where it would run serially with the model.
            memory=DECODE_TASK_BASE_MEMORY + FILES_PER_DECODE_BATCH * decoded_image_bytes(cfg),
        )
        detected = decoded.map_batches(
            detector,
            batch_format="pyarrow",
            batch_size=rows_per_call(block_rows, model_batch),
            fn_constructor_kwargs=dict(
                spec=spec,
                num_threads=int(max(1, resources.num_cpus_per_actor)),
                precision=cfg.inference.precision.value,
                batch_size=model_batch,
                cpu_fallback=cfg.inference.cpu_fallback,
            ),
            # A CPU actor takes seconds per batch: it is handed its next block only when free, so that no
            # block waits in one actor's queue while another actor idles. A GPU actor (or a lone actor,
            # whose queue nothing else could take from) gets its next block while it computes, to have it
            # at hand.
            compute=ray.data.ActorPoolStrategy(
                size=resources.num_actors,
                max_tasks_in_flight_per_actor=2 if resources.num_gpus or resources.num_actors == 1 else 1,
            ),
            num_gpus=resources.num_gpus,
            num_cpus=resources.num_cpus_per_actor,
        )
        # The driver is the only writer: it commits result files one by one as rows stream in, so rows
        # are committed exactly once even when Ray retries tasks or restarts actors on other nodes.
        writer = ResultWriter(output, lease.owner, cfg.output.rows_per_file, cfg.output.commit_interval_s)
        try:
            for rows in detected.iter_batches(batch_format="pyarrow", batch_size=None):
                workers.update(pc.unique(rows.column(WORKER_COLUMN)).to_pylist())
                lease.check()
                writer.add(rows.drop_columns([WORKER_COLUMN]))
                processed += rows.num_rows
        except Exception as error:
            reason = device_error_in(error)
            if reason is None:
                raise
            raise DeviceUnavailable(reason) from None
        writer.close()

    total = inputs.table.num_rows if inputs.table is not None else ray.get(tally.total.remote())
    if not total:
        raise no_images(cfg)
    summary = summarize(output, total, processed, started, spec)
    summary.detector_actors = len(workers)
    summary.detector_nodes = len({worker.split("/", 2)[0] for worker in workers})
    summary.detector_gpus = len(workers) * gpus_per_actor
    summary.detector_devices = dict(sorted(Counter(worker.split("/", 2)[2] for worker in workers).items()))
    on_cpu = summary.detector_devices.get("cpu", 0)
    if gpus_per_actor and on_cpu:
        summary.warnings.append(
            f"GPUs were requested, but {on_cpu} of {len(workers)} detector actors ran on the CPU (inference.cpu_fallback=true)"
        )
    write_json(output.filesystem, output.join(MANIFEST_NAME), manifest(cfg, spec, summary))
    return check_errors(cfg, summary)


def summarize(output: storage.Location, inputs: int, processed: int, started: float, spec: ModelSpec) -> Summary:
    """Count the committed rows, checking each input has exactly one."""
    scan, _ = resume.scan_output(output, in_ray=ray.is_initialized())
    if scan.rows != scan.unique_paths or scan.unique_paths < inputs:
        raise RuntimeError(f"{output.uri(output.path)} holds {scan.rows} rows for {scan.unique_paths} paths and {inputs} inputs")
    kinds = scan.errors_by_kind
    errors = sum(kinds.values())
    wall = time.monotonic() - started
    return Summary(
        output_path=output.uri(output.path),
        inputs=scan.rows,
        processed=processed,
        ok=scan.rows - errors,
        errors=errors,
        detections=scan.detections,
        errors_by_kind=dict(sorted(kinds.items())),
        wall_seconds=round(wall, 3),
        images_per_second=round(processed / wall, 3) if wall > 0 else 0.0,
        weights=spec.weights,
        warnings=[f"random weights: {spec.fallback_reason}"] if spec.fallback_reason else [],
    )


def check_errors(cfg: AppConfig, summary: Summary) -> Summary:
    if summary.errors > cfg.data.max_error_fraction * summary.inputs:
        raise TooManyErrors(summary, cfg.data.max_error_fraction)
    return summary


def manifest(cfg: AppConfig, spec: ModelSpec, summary: Summary) -> dict:
    return {
        "complete": True,
        "config": OmegaConf.to_container(cfg, resolve=True),
        "versions": {
            "app": app.__version__,
            "ray": ray.__version__,
            "torch": torch.__version__,
            "torch_cuda": torch.version.cuda,
            "torchvision": torchvision.__version__,
        },
        "model": {"name": spec.name, "weights": spec.weights, "random_init_fallback": spec.fallback_reason},
        "counts": {
            "inputs": summary.inputs,
            "ok": summary.ok,
            "errors": summary.errors,
            "detections": summary.detections,
            "errors_by_kind": summary.errors_by_kind,
        },
        "max_error_fraction_exceeded": summary.errors > cfg.data.max_error_fraction * summary.inputs,
        "warnings": summary.warnings,
        "processed_by_last_run": summary.processed,
        "detector_by_last_run": {
            "actors": summary.detector_actors,
            "nodes": summary.detector_nodes,
            "gpus": summary.detector_gpus,
            "devices": summary.detector_devices,
        },
        "wall_seconds": summary.wall_seconds,
        "images_per_second": summary.images_per_second,
    }
