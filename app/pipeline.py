"""The batch job: list inputs → read bytes and decode (CPU tasks) → detect (actor pool) → write Parquet."""

import logging
import math
import os
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import ray
import torch
import torchvision
from omegaconf import OmegaConf

import app
from app import storage
from app.config import SAMPLES_DIR, AppConfig, InferenceConfig
from app.decode import DecodeOptions, decode_images
from app.detector import Detector
from app.model import MODEL_NAMES, ModelSpec, WeightsError, resolve_weights
from app.results import MANIFEST_NAME, STAGING_DIR, write_json

log = logging.getLogger("app")

AUTO = "auto"
# Files per decode task: small enough to spread work over many CPUs, large enough to amortise a task.
FILES_PER_DECODE_TASK = 16


class ConfigError(Exception):
    """A configuration mistake, found before any work starts; the message is one line."""


@dataclass(frozen=True)
class Resources:
    """What the detector stage asks Ray for, with "auto" resolved against the cluster."""

    num_gpus: float
    num_actors: int
    num_cpus_per_actor: float


@dataclass
class Summary:
    """What a run did; also the counts in the manifest."""

    output_path: str
    inputs: int
    ok: int
    errors: int
    detections: int
    errors_by_kind: dict[str, int] = field(default_factory=dict)
    wall_seconds: float = 0.0
    images_per_second: float = 0.0
    weights: str = ""
    warnings: list[str] = field(default_factory=list)


def parse_number(key: str, value: str, minimum: float) -> float:
    try:
        number = float(value)
    except ValueError:
        raise ConfigError(f"{key}={value!r} must be {AUTO!r} or a number") from None
    if number < minimum or math.isnan(number):
        raise ConfigError(f"{key}={value!r} must be at least {minimum:g}")
    return number


def plan_resources(inference: InferenceConfig, cluster: dict[str, float], local: bool = True) -> Resources:
    """Resolve the "auto" settings of the detector stage against the cluster's resources.

    A local Ray instance cannot grow, so asking it for GPUs it lacks is a config error; an attached
    cluster may still add GPU nodes through its autoscaler, so there it is only a warning.
    """
    cluster_gpus, cluster_cpus = cluster.get("GPU", 0.0), cluster.get("CPU", 1.0)
    if inference.num_gpus == AUTO:
        num_gpus = 1.0 if cluster_gpus > 0 else 0.0
    else:
        num_gpus = parse_number("inference.num_gpus", inference.num_gpus, 0)
        if num_gpus > 0 and cluster_gpus == 0:
            message = f"inference.num_gpus={inference.num_gpus} but the Ray cluster has no GPUs"
            if local:
                raise ConfigError(message)
            log.warning("%s yet; waiting for its autoscaler to add GPU nodes", message)
    if inference.num_actors == AUTO:
        num_actors = max(1, int(cluster_gpus // num_gpus)) if num_gpus else 1
    else:
        num_actors = int(parse_number("inference.num_actors", inference.num_actors, 1))
    if inference.num_cpus_per_actor == AUTO:
        # With a GPU one CPU feeds it; on CPU the actors share all cores but one, left for decoding.
        num_cpus = 1.0 if num_gpus else max(1.0, (cluster_cpus - 1) // num_actors)
    else:
        num_cpus = parse_number("inference.num_cpus_per_actor", inference.num_cpus_per_actor, 0)
    return Resources(num_gpus=num_gpus, num_actors=num_actors, num_cpus_per_actor=num_cpus)


def decoded_image_bytes(cfg: AppConfig) -> int:
    """Upper bound of one decoded image's pixels at model size; a 12 MP photo when not resizing."""
    if cfg.inference.resize_on_cpu:
        return cfg.model.min_size * cfg.model.max_size * 3
    return 12_000_000 * 3


def check_config(cfg: AppConfig) -> None:
    """Value checks the schema's types cannot express."""
    if cfg.model.name not in MODEL_NAMES:
        raise ConfigError(f"model.name={cfg.model.name!r} is not one of {', '.join(MODEL_NAMES)}")
    if cfg.inference.batch_size < 1:
        raise ConfigError(f"inference.batch_size={cfg.inference.batch_size} must be at least 1")
    if not 0 <= cfg.model.score_threshold <= 1:
        raise ConfigError(f"model.score_threshold={cfg.model.score_threshold} must be between 0 and 1")
    for key in ("num_gpus", "num_actors", "num_cpus_per_actor"):
        value = getattr(cfg.inference, key)
        if value != AUTO:
            parse_number(f"inference.{key}", value, 1 if key == "num_actors" else 0)


def list_inputs(cfg: AppConfig) -> tuple[storage.Location, pa.Table]:
    try:
        source, files = storage.list_images(cfg.data.path, list(cfg.data.extensions))
    except storage.StorageError as error:
        raise ConfigError(str(error)) from None
    if not files:
        extensions = ", ".join(cfg.data.extensions)
        raise ConfigError(f"data.path {cfg.data.path} holds no image files (extensions: {extensions})")
    table = pa.table({"path": [info.path for info in files], "size": [info.size for info in files]})
    return source, table


def prepare_output(cfg: AppConfig) -> storage.Location:
    """Refuse to mix this run's rows with results already in output.path, unless asked to replace them."""
    try:
        output = storage.resolve(cfg.output.path)
        info = output.filesystem.get_file_info(output.path)
    except (storage.StorageError, OSError) as error:
        raise ConfigError(f"output.path {cfg.output.path} cannot be used: {error}") from None
    if info.type == pafs.FileType.File:
        raise ConfigError(f"output.path {cfg.output.path} is a file, not a directory")
    if info.type == pafs.FileType.Directory:
        existing = output.filesystem.get_file_info(pafs.FileSelector(output.path))
        if existing and not cfg.output.overwrite:
            raise ConfigError(
                f"output.path {cfg.output.path} is not empty; choose another output.path "
                f"or pass output.overwrite=true to replace its contents"
            )
        if existing:
            output.filesystem.delete_dir_contents(output.path)
    output.filesystem.create_dir(output.path, recursive=True)
    return output


def model_spec(cfg: AppConfig) -> ModelSpec:
    spec = ModelSpec(
        name=cfg.model.name,
        weights=str(cfg.model.weights),
        score_threshold=cfg.model.score_threshold,
        min_size=cfg.model.min_size,
        max_size=cfg.model.max_size,
        num_classes=cfg.model.num_classes,
        class_names=tuple(cfg.model.class_names) if cfg.model.class_names else None,
    )
    # Only the embedded demo (the bundled samples) may run without the weights it asked for.
    is_demo = storage.resolve(cfg.data.path).path == str(SAMPLES_DIR)
    try:
        return resolve_weights(spec, allow_random_fallback=is_demo)
    except (WeightsError, storage.StorageError) as error:
        raise ConfigError(str(error)) from None


def connect_ray(cfg: AppConfig) -> bool:
    """Attach to the cluster in ray.address or RAY_ADDRESS (as in a RayJob), else start Ray locally.

    Returns whether Ray runs locally (in this process's machine, without an autoscaler)."""
    if ray.is_initialized():
        return len(ray.nodes()) == 1
    if cfg.ray.address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=cfg.ray.address, log_to_driver=False)
        return False
    ray.init(num_cpus=cfg.ray.num_cpus, include_dashboard=cfg.ray.include_dashboard, log_to_driver=False)
    return True


def run(cfg: AppConfig) -> Summary:
    """Run the batch job described by cfg; raises ConfigError before any work when cfg is wrong."""
    started = time.monotonic()
    check_config(cfg)
    source, files = list_inputs(cfg)
    spec = model_spec(cfg)
    output = prepare_output(cfg)
    local = connect_ray(cfg)
    resources = plan_resources(cfg.inference, ray.cluster_resources(), local)
    if spec.fallback_reason:
        log.warning("!" * 80)
        log.warning("DEMO RUNS WITH RANDOM WEIGHTS: its detections are meaningless. %s", spec.fallback_reason)
        log.warning("!" * 80)
    log.info("%d images from %s; detector: %s", files.num_rows, cfg.data.path, resources)

    resize = cfg.inference.resize_on_cpu
    decode_options = DecodeOptions(
        max_file_bytes=cfg.data.max_file_bytes,
        max_image_pixels=cfg.data.max_image_pixels,
        min_size=cfg.model.min_size if resize else None,
        max_size=cfg.model.max_size if resize else None,
    )
    run_id = uuid.uuid4().hex[:12]
    staging = output.join(STAGING_DIR, run_id)
    blocks = [files.slice(i, FILES_PER_DECODE_TASK) for i in range(0, files.num_rows, FILES_PER_DECODE_TASK)]

    images = ray.data.from_arrow(blocks)
    decoded = images.map_batches(
        decode_images,
        batch_format="pyarrow",
        batch_size=None,
        fn_kwargs=dict(filesystem=source.filesystem, uri_prefix=source.uri_prefix, options=decode_options),
        num_cpus=1,
        # The task's output, declared so Ray can plan memory. As the detector declares no memory, this
        # also keeps Ray from fusing decoding into the actors, where it would run serially with the model.
        memory=FILES_PER_DECODE_TASK * decoded_image_bytes(cfg),
    )
    detected = decoded.map_batches(
        Detector,
        batch_format="pyarrow",
        batch_size=cfg.inference.batch_size,
        fn_constructor_kwargs=dict(spec=spec, num_threads=int(max(1, resources.num_cpus_per_actor))),
        compute=ray.data.ActorPoolStrategy(size=resources.num_actors),
        num_gpus=resources.num_gpus,
        num_cpus=resources.num_cpus_per_actor,
    )
    detected.write_parquet(staging, filesystem=output.filesystem)

    summary = publish(output, staging, run_id, files.num_rows, started, spec)
    write_json(output.filesystem, output.join(MANIFEST_NAME), manifest(cfg, spec, resources, summary, run_id))
    return summary


def publish(
    output: storage.Location, staging: str, run_id: str, inputs: int, started: float, spec: ModelSpec
) -> Summary:
    """Count the staged rows, then move the staged files into the dataset directory."""
    staged = pads.dataset(staging, filesystem=output.filesystem, format="parquet")
    table = staged.to_table(columns=["error_kind", "num_detections"])
    if table.num_rows != inputs:
        raise RuntimeError(f"the run wrote {table.num_rows} rows for {inputs} inputs; nothing was published")
    kinds = Counter(kind for kind in table.column("error_kind").to_pylist() if kind is not None)
    for fragment in staged.files:
        name = fragment.rsplit("/", 1)[-1]
        output.filesystem.move(fragment, output.join(f"part-{run_id}-{name}"))
    output.filesystem.delete_dir(output.join(STAGING_DIR))
    wall = time.monotonic() - started
    errors = sum(kinds.values())
    warnings = [f"random weights: {spec.fallback_reason}"] if spec.fallback_reason else []
    return Summary(
        output_path=output.uri(output.path),
        inputs=inputs,
        ok=inputs - errors,
        errors=errors,
        detections=int(pc.sum(table.column("num_detections")).as_py() or 0),
        errors_by_kind=dict(sorted(kinds.items())),
        wall_seconds=round(wall, 3),
        images_per_second=round(inputs / wall, 3) if wall > 0 else 0.0,
        weights=spec.weights,
        warnings=warnings,
    )


def manifest(cfg: AppConfig, spec: ModelSpec, resources: Resources, summary: Summary, run_id: str) -> dict:
    return {
        "run_id": run_id,
        "complete": True,
        "config": OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True),
        "versions": {
            "app": app.__version__,
            "ray": ray.__version__,
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
        },
        "model": {"name": spec.name, "weights": spec.weights, "random_init_fallback": spec.fallback_reason},
        "resources": asdict(resources),
        "counts": {
            "inputs": summary.inputs,
            "ok": summary.ok,
            "errors": summary.errors,
            "detections": summary.detections,
            "errors_by_kind": summary.errors_by_kind,
        },
        "wall_seconds": summary.wall_seconds,
        "images_per_second": summary.images_per_second,
    }
