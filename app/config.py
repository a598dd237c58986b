"""Typed configuration schema.

The dataclasses below are registered in Hydra's ConfigStore as ``base_config``; the YAML files under
``app/conf`` fill them in. Because every node is typed, a misspelt key or a value of the wrong type
fails at composition, naming the key, before Ray starts.
"""

import math
import re
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Optional, Sequence

from omegaconf import MISSING, OmegaConf

from app.credentials import setting_with_credentials
from app.result_schema import COMMITTED_ERRORS

SAMPLES_DIR = Path(__file__).parent / "samples"
# The value of the inference settings that the job resolves against the cluster (app.plan).
AUTO = "auto"
IMAGE_EXTENSIONS = ["jpg", "jpeg", "png", "bmp", "tif", "tiff", "webp", "gif"]
VIDEO_EXTENSIONS = ["mp4", "mov", "mkv", "webm", "avi"]
# The storage a run reads by default (app.storage): local files (`file`: a path without a scheme), S3, GCS,
# HDFS and Azure. Not http(s): a manifest made elsewhere must not send the workers to any web address (a
# cloud's metadata service, a service inside the cluster).
STORAGE_SCHEMES = ["file", "s3", "gs", "gcs", "hdfs", "abfs", "abfss", "az"]
# A URI's scheme, as app.storage tells a URI from a local path.
URI_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")
# A SHA-256 as hexadecimal digits.
SHA256_HEX = re.compile(r"[0-9a-f]{64}")


class VideoSampling(str, Enum):
    """Which frames of a video are detected (app.video)."""

    fps = "fps"  # the first frame of each 1/data.video.fps second
    all = "all"  # every frame
    keyframes = "keyframes"  # the key frames alone: the cheapest to decode


@dataclass
class VideoConfig:
    # Files with these extensions are videos: each frame data.video.sample chooses gets its row (app.video).
    # [] reads no video.
    extensions: list[str] = field(default_factory=lambda: list(VIDEO_EXTENSIONS))
    sample: VideoSampling = VideoSampling.fps
    # Frames detected per second of video with sample=fps.
    fps: float = 1.0
    # Seconds of a video one decode task decodes: the segments of a long video run in parallel.
    segment_s: float = 60.0
    # A longer video becomes one error row (kind too_long).
    max_duration_s: float = 4 * 3600.0


@dataclass
class DataConfig:
    # Local directory (searched recursively), glob, single file, or URI (s3://, gs://, any fsspec protocol).
    path: str = MISSING
    # A list of the images instead of listing data.path: a Parquet or CSV file or folder with a `path`
    # column, or an S3 Inventory report's manifest.json (see docs/inputs.md). data.path is then not read.
    manifest: Optional[str] = None
    # File extensions treated as images, matched case-insensitively; other files are ignored. Only the
    # image formats of these extensions are decoded (a PNG named .jpg is, a PostScript file named .jpg is not).
    extensions: list[str] = field(default_factory=lambda: list(IMAGE_EXTENSIONS))
    # URI schemes that data.path, data.manifest and the paths a manifest lists may have ("file": local
    # paths). A manifest's path of another scheme becomes an error row (kind "unreadable"); data.path or
    # data.manifest of another scheme is a config error.
    allowed_schemes: list[str] = field(default_factory=lambda: list(STORAGE_SCHEMES))
    # Files larger than this are not read; they become error rows (kind "too_large").
    max_file_bytes: int = 64 * 1024 * 1024
    # Images with more pixels than this are not decoded (decompression-bomb guard); Pillow's own limit is 89M.
    max_image_pixels: int = 40_000_000
    # Fail the run (exit code 3, after every row is written) when more than this fraction of the images are
    # errors: a run where most images fail has the wrong inputs or settings, not a few bad files. Lower it
    # for curated data sets; 1.0 never fails.
    max_error_fraction: float = 0.5
    # Tries of a file read that fails for a reason that may pass (throttling, 5xx, timeouts, resets), with
    # exponential backoff and full jitter between them; a file still failing gets no row, and a rerun reads it.
    read_attempts: int = 5
    # Read retries the whole run may spend; once they are spent, storage is failing for everyone and the
    # run stops (exit code 9) with its rows so far committed; a rerun goes on.
    read_retry_budget: int = 100_000
    # A file left unread (storage kept failing for reasons that may pass) by this many runs in a row is
    # committed as an error row of kind kept_failing, so that the output finishes.
    transient_runs: int = 3
    # Error kinds whose committed rows this run reads again and replaces (e.g. [unreadable] after fixing
    # permissions, [kept_failing] after an outage); each image still ends with exactly one row.
    retry_errors: list[str] = field(default_factory=list)
    video: VideoConfig = field(default_factory=VideoConfig)


@dataclass
class ModelConfig:
    # A torchvision detection model name (see app/conf/model/).
    name: str = MISSING
    # DEFAULT (torchvision's pretrained COCO weights), a checkpoint path or URI, or none (random init).
    weights: str = "DEFAULT"
    # The checkpoint's SHA-256 (64 hex digits): the driver and every detector actor refuse other bytes.
    # Unset, the digest the first run read is recorded in the output's settings all the same.
    checkpoint_sha256: Optional[str] = None
    # Detections scoring at or below this are dropped (torchvision keeps scores above it).
    score_threshold: float = 0.5
    # Detections kept per image, at most: the highest-scoring ones.
    max_detections: int = 100
    # Model input size: the shorter side is scaled to min_size unless the longer would exceed max_size.
    min_size: int = 800
    max_size: int = 1333
    # For checkpoints of fine-tuned models: number of classes (background included) and their names.
    num_classes: Optional[int] = None
    class_names: Optional[list[str]] = None


class Precision(str, Enum):
    """Arithmetic of the model on a GPU: full float32, or float16/bfloat16 autocast."""

    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"


@dataclass
class InferenceConfig:
    # Images per model call; null = the model's default on the device the actors run on (see docs/performance.md).
    # With calibrate_batch_size, the largest batch size tried (null: the model's default times 4).
    batch_size: Optional[int] = None
    # Each detector actor picks its batch size at start: a few timed model calls at batch sizes 1, 2, 4, ...
    # on the largest padded input choose the smallest within 5% of the best time per image that leaves 15%
    # of its GPU memory free (app.calibration). Meant for GPUs; each new combination of GPU, model,
    # precision and torch costs a few seconds once, then comes from calibration_cache.
    calibrate_batch_size: bool = False
    # Where calibrated batch sizes are kept: a path (on each node) or a URI (s3://bucket/ray-detect/batch-sizes.json:
    # shared, so that new GPU pods reuse it). null = ~/.cache/ray-detect/batch-sizes.json.
    calibration_cache: Optional[str] = None
    # GPUs per detector actor: "auto" = 1 when the Ray cluster has GPUs, else 0. Fractions share a GPU.
    num_gpus: str = "auto"
    # Detector actors sharing each GPU (num_gpus auto or 1): each takes 1/actors_per_gpu of a GPU and as much
    # of its memory. 2 keeps a GPU busy while one actor's Python launches kernels (a host-bound model).
    actors_per_gpu: int = 1
    # Detector actor-pool size: "auto" = one actor per GPU in the cluster; on CPU, as many as fit.
    num_actors: str = "auto"
    # Detector actors, at most, when num_actors is "auto": leaves part of a shared cluster to others.
    # null = as many as the cluster has, or may grow to (RAY_DETECT_MAX_GPUS / RAY_DETECT_MAX_CPUS).
    max_actors: Optional[int] = None
    # CPUs each detector actor reserves (= torch threads): "auto" = 1 with a GPU; on CPU, half of the
    # largest node's CPUs, at most 4 (a 2-core node runs two 1-thread actors), or with num_actors set,
    # the cluster's CPUs shared among them.
    num_cpus_per_actor: str = "auto"
    # fp16 or bf16: run the model under autocast (on GPUs with tensor cores); fp32 = plain float32.
    precision: Precision = Precision.fp32
    # A detector actor given a GPU that torch cannot use (e.g. a driver too old for torch's CUDA) stops the
    # run; true runs it on the CPU instead, with a warning (for nodes that advertise a GPU resource only).
    cpu_fallback: bool = False
    # Resize to the model's input size in the CPU stage, so only uint8 pixels at model size cross stages.
    resize_on_cpu: bool = True
    # The model's convolution weights in channels-last layout (NHWC), which tensor cores prefer under fp16/bf16.
    channels_last: bool = False
    # cuDNN tries its convolution algorithms on each new input shape and keeps the fastest (torch's
    # cudnn.benchmark): pays where shapes repeat, as shape batching's padded shapes do over a long run.
    cudnn_benchmark: bool = False
    # Price of one GPU-hour (any currency): the summary and the manifest then give the cost of a million
    # images (the GPUs the detector actors held, for the run's wall time). null: no cost figure.
    gpu_hour_price: Optional[float] = None


class MergeMethod(str, Enum):
    """How detections of one object found by overlapping tiles become one: nms keeps the highest-scoring
    box, nmm (greedy non-maximum merging) merges the matching boxes into their union."""

    nms = "nms"
    nmm = "nmm"


class MatchMetric(str, Enum):
    """When two boxes are one object: their intersection over their union (iou), or over the smaller
    box's area (ios: a box cut by a tile's edge matches the whole one)."""

    iou = "iou"
    ios = "ios"


@dataclass
class TilingConfig:
    """Sliced detection of large images (the `tiling` group: none or tiles). With tiles, an image larger
    than a tile is detected in overlapping tiles at full resolution, and their detections are merged
    (app.tiling). Every key but `enabled` is set by tiling=tiles and must stay unset with tiling=none."""

    enabled: bool = False
    # Side of the square tiles, in image pixels (tiling=tiles: the model's input size, model.min_size).
    tile_size: Optional[int] = None
    # Fraction of a tile that neighbouring tiles share, at least 0 and below 1.
    overlap: Optional[float] = None
    # Also detect the whole image at the model's input size (for objects larger than a tile).
    full_image: Optional[bool] = None
    merge: Optional[MergeMethod] = None
    match_metric: Optional[MatchMetric] = None
    # Boxes whose match_metric is at least this are one object.
    match_threshold: Optional[float] = None
    # Merge only boxes of the same label; false merges across labels (the higher score's label wins).
    class_aware: Optional[bool] = None


class OutputFormat(str, Enum):
    """Where the result rows go: a folder of Parquet files, a Delta Lake table, or an Apache Iceberg table."""

    parquet = "parquet"
    delta = "delta"
    iceberg = "iceberg"


@dataclass
class OutputConfig:
    # Directory or URI of the Parquet dataset; with format=delta the Delta table's; with format=iceberg the
    # folder of the run's bookkeeping (lease, settings, manifest), the rows going to output.table.
    path: str = MISSING
    # parquet, delta or iceberg (docs/outputs.md): pick with output=delta or output=iceberg.
    format: OutputFormat = OutputFormat.parquet
    # format=iceberg: the pyiceberg catalog's name (configured in ~/.pyiceberg.yaml or PYICEBERG_CATALOG__<NAME>__*
    # variables; "local" without a configuration: SQLite under ./iceberg) and the table, NAMESPACE.TABLE.
    catalog: Optional[str] = None
    table: Optional[str] = None
    # Delete what output.path holds and start afresh, instead of resuming the run that wrote it.
    overwrite: bool = False
    # Rows are committed in files of at most this many rows, and with the next rows that arrive once
    # commit_interval_s seconds have passed since the last commit: a crashed run loses only rows not yet
    # committed.
    rows_per_file: int = 10_000
    commit_interval_s: float = 60.0
    # One run at a time: a run holds a lease on output.path and renews it every lease_heartbeat_s seconds;
    # a lease not renewed for lease_timeout_s belongs to a run that died, and the next run takes it over.
    lease_timeout_s: float = 180.0
    lease_heartbeat_s: float = 30.0
    # How long a run waits for another run's lease to go stale before it gives up (a retried job whose
    # driver died elsewhere); 0 gives up at once.
    lease_wait_s: float = 0.0
    # A run that finds output.path held by a live run ends at once with exit code 0 and one line saying so,
    # instead of exit code 5: for scheduled runs, where the previous run still going is no failure.
    skip_if_in_use: bool = False


@dataclass
class RayConfig:
    # Cluster address; null = RAY_ADDRESS when set (as in a RayJob), else a local Ray started in-process.
    address: Optional[str] = None
    # CPUs of the local Ray instance (null = all); ignored when attaching to a cluster.
    num_cpus: Optional[int] = None
    # Start the dashboard with a local Ray instance.
    include_dashboard: bool = False


@dataclass
class ProgressConfig:
    # Seconds between the run's progress lines (done / total, rate, time left, errors); on a terminal the
    # line is also redrawn every second.
    interval_s: float = 30.0
    # Ray Data's own progress (bars, or operator tables every 10 s in a log) and execution lines on the
    # console; off, they go to Ray Data's log file only (ray-data.log in the Ray session's logs).
    ray_data: bool = False


@dataclass
class MetricsConfig:
    # The `run` label of the app's metrics (app.metrics): one name for a run and for the scheduled runs
    # that resume it (the chart sets its job's run name). Keep it low-cardinality: never a path or a date.
    run: str = "ray-detect"


@dataclass
class AppConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    tiling: TilingConfig = field(default_factory=TilingConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    progress: ProgressConfig = field(default_factory=ProgressConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)


def compose_config(overrides=(), with_hydra: bool = False):
    """The app's config with Hydra overrides applied, as `python -m app` composes it; with_hydra keeps
    Hydra's own settings (logging, help) under `hydra`."""
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="app.conf", version_base=None):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=with_hydra)


def config_groups() -> dict[str, list[str]]:
    """The app's config groups (the folders of app/conf) and the options of each, as Hydra finds them."""
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    with initialize_config_module(config_module="app.conf", version_base=None):
        loader = GlobalHydra.instance().config_loader()
        groups = sorted(group for group in loader.list_groups("") if group != "hydra")
        return {group: sorted(loader.get_group_options(group)) for group in groups}


def image_formats(extensions: Sequence[str]) -> tuple[str, ...]:
    """Pillow's formats of these file extensions (data.extensions, with or without the dot, in any case),
    sorted: the only decoders a run lets open its files, whatever a file's bytes claim to be. ValueError
    names an extension of no format Pillow opens."""
    from PIL import Image  # here: the config is read where Pillow is not needed

    Image.init()
    registered = Image.registered_extensions()
    formats = set()
    for extension in extensions:
        fmt = registered.get("." + extension.lower().lstrip("."))
        if fmt not in Image.OPEN:  # unknown, or a format Pillow only writes (.pdf)
            raise ValueError(f"{extension!r} is the extension of no image format that Pillow opens")
        formats.add(fmt)
    return tuple(sorted(formats))


def register_configs() -> None:
    """Register the schema and the resolver that points at the bundled sample images."""
    from hydra.core.config_store import ConfigStore  # here: the result commands read configs without Hydra

    ConfigStore.instance().store(name="base_config", node=AppConfig)
    if not OmegaConf.has_resolver("samples_dir"):
        OmegaConf.register_new_resolver("samples_dir", lambda: str(SAMPLES_DIR))


class ConfigError(Exception):
    """A configuration mistake, found before any work starts; the message is one line."""


def parse_number(key: str, value: str, minimum: float) -> float:
    """A setting that is AUTO or a number, read as a number of at least `minimum`."""
    try:
        number = float(value)
    except ValueError:
        raise ConfigError(f"{key}={value!r} must be {AUTO!r} or a number") from None
    if number < minimum or math.isnan(number):
        raise ConfigError(f"{key}={value!r} must be at least {minimum:g}")
    return number


def check_config(cfg: AppConfig) -> None:
    """Value checks the schema's types cannot express."""
    from app.model import MODEL_NAMES, PRETRAINED, RANDOM_INIT

    # First: the checks below may quote a value.
    refusal = setting_with_credentials(config_leaves(cfg))
    if refusal:
        # The value is not repeated: the settings, the manifest, the RayJob and the log would all hold it.
        raise ConfigError(refusal)
    if cfg.model.name not in MODEL_NAMES:
        raise ConfigError(f"model.name={cfg.model.name!r} is not one of {', '.join(MODEL_NAMES)}")
    if cfg.inference.max_actors is not None and cfg.inference.max_actors < 1:
        raise ConfigError(f"inference.max_actors={cfg.inference.max_actors} must be at least 1")
    if cfg.inference.actors_per_gpu < 1:
        raise ConfigError(f"inference.actors_per_gpu={cfg.inference.actors_per_gpu} must be at least 1")
    if cfg.inference.gpu_hour_price is not None and not cfg.inference.gpu_hour_price >= 0:
        raise ConfigError(f"inference.gpu_hour_price={cfg.inference.gpu_hour_price} must be at least 0")
    if cfg.inference.batch_size is not None and cfg.inference.batch_size < 1:
        raise ConfigError(f"inference.batch_size={cfg.inference.batch_size} must be at least 1")
    if cfg.output.format == OutputFormat.iceberg and not (cfg.output.catalog and "." in (cfg.output.table or "").strip(".")):
        raise ConfigError(f"output=iceberg needs output.catalog (a pyiceberg catalog's name) and output.table as "
                          f"NAMESPACE.TABLE, not catalog={cfg.output.catalog!r} table={cfg.output.table!r}")
    if cfg.output.rows_per_file < 1:
        raise ConfigError(f"output.rows_per_file={cfg.output.rows_per_file} must be at least 1")
    if cfg.data.read_attempts < 1:
        raise ConfigError(f"data.read_attempts={cfg.data.read_attempts} must be at least 1")
    if cfg.data.read_retry_budget < 0:
        raise ConfigError(f"data.read_retry_budget={cfg.data.read_retry_budget} must be at least 0")
    if cfg.data.transient_runs < 1:
        raise ConfigError(f"data.transient_runs={cfg.data.transient_runs} must be at least 1")
    unknown = [kind for kind in cfg.data.retry_errors if kind not in COMMITTED_ERRORS]
    if unknown:
        raise ConfigError(f"data.retry_errors: {unknown[0]!r} is not an error kind rows are committed with "
                          f"(one of {', '.join(COMMITTED_ERRORS)})")
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
    if not cfg.progress.interval_s > 0:
        raise ConfigError(f"progress.interval_s={cfg.progress.interval_s} must be above 0")
    check_tiling(cfg.tiling)
    for key in ("num_gpus", "num_actors", "num_cpus_per_actor"):
        value = getattr(cfg.inference, key)
        if value != AUTO:
            parse_number(f"inference.{key}", value, 1 if key == "num_actors" else 0)
    try:
        image_formats(cfg.data.extensions)
    except ValueError as error:
        raise ConfigError(f"data.extensions: {error}") from None
    check_video(cfg.data)
    allowed = [scheme.lower() for scheme in cfg.data.allowed_schemes]
    for key, value in (("data.path", cfg.data.path), ("data.manifest", cfg.data.manifest)):
        if value and uri_scheme(value) not in allowed:
            raise ConfigError(f"{key} has the scheme {uri_scheme(value)!r}, which is not in data.allowed_schemes "
                              f"({', '.join(allowed)}); add it there to read from it")
    digest = cfg.model.checkpoint_sha256
    if digest is not None:
        if not SHA256_HEX.fullmatch(digest.lower()):
            raise ConfigError(f"model.checkpoint_sha256={digest!r} must be a SHA-256: 64 hexadecimal digits")
        if cfg.model.weights.upper() == PRETRAINED or cfg.model.weights.lower() in (RANDOM_INIT, "null", ""):
            raise ConfigError(f"model.checkpoint_sha256 is set but model.weights={cfg.model.weights!r} is not a "
                              "checkpoint: set model.weights to the checkpoint's path or URI, or unset the digest")


def config_leaves(cfg: AppConfig, prefix: str = ""):
    """(dotted key, value) of every leaf of the config, interpolations resolved: what a run stores."""
    node = OmegaConf.to_container(cfg, resolve=True) if not isinstance(cfg, dict) else cfg
    for key, value in node.items():
        if isinstance(value, dict):
            yield from config_leaves(value, f"{prefix}{key}.")
        elif isinstance(value, list):
            yield from ((f"{prefix}{key}[{i}]", item) for i, item in enumerate(value))
        else:
            yield f"{prefix}{key}", value


def uri_scheme(uri: str) -> str:
    """The scheme of a path or URI, in lower case: "file" for a local path."""
    match = URI_SCHEME.match(uri)
    return match.group(1).lower() if match else "file"


def check_video(data: DataConfig) -> None:
    video = data.video
    for key in ("fps", "segment_s", "max_duration_s"):
        if not getattr(video, key) > 0:
            raise ConfigError(f"data.video.{key}={getattr(video, key)} must be above 0")
    images = {extension.lower().lstrip(".") for extension in data.extensions}
    both = sorted(images & {extension.lower().lstrip(".") for extension in video.extensions})
    if both:
        raise ConfigError(f"{both[0]!r} is in both data.extensions and data.video.extensions: a file is an image or a video")


def check_tiling(tiling: TilingConfig) -> None:
    keys = [name for name in TilingConfig.__dataclass_fields__ if name != "enabled"]
    if not tiling.enabled:
        for key in keys:
            if getattr(tiling, key) is not None:
                raise ConfigError(f"tiling.{key}={getattr(tiling, key)} is set but tiling is off: add tiling=tiles")
        return
    for key in keys:
        if getattr(tiling, key) is None:
            raise ConfigError(f"tiling.{key} must be set with tiling=tiles")
    if tiling.tile_size < 32:
        raise ConfigError(f"tiling.tile_size={tiling.tile_size} must be at least 32")
    if not 0 <= tiling.overlap < 1:
        raise ConfigError(f"tiling.overlap={tiling.overlap} must be at least 0 and below 1")
    if not 0 <= tiling.match_threshold <= 1:
        raise ConfigError(f"tiling.match_threshold={tiling.match_threshold} must be between 0 and 1")
