"""The output dataset: one Parquet row per input image, committed file by file, and the run manifest.

Layout of output.path (the commit protocol):
  part-g<gen>-<seq>.parquet committed rows of the run holding lease generation <gen> (10 digits; older
                            names without "g" count as generation 0). Each file is written whole under
                            _staging/ and then moved here in one step, so readers never see a half-written
                            file (writer.py). A file of a generation that was taken over, with a seq at or
                            above the limit its successor recorded, is not part of the dataset: one
                            function, `committed_files`, decides what is.
  _settings.json            what the rows depend on, written when the first run starts. A later run on
                            the same output.path resumes only with the same settings.
  _staging/                 files being written; anything left there by a crashed run is discarded.
  _manifest.json            written last, when every input has its row: a directory without it is an
                            incomplete run (`read_manifest` is the one place that decides).
  _lease/<gen>.json         one lease file per generation (10 digits), never deleted: the highest is the
                            current one, and it carries the limits of the generations taken over (lease.py).
  _transient.parquet        the inputs without a row because storage kept failing for reasons that may pass
                            (path, last error, runs in a row); a rerun reads them (app.output.verdicts).
Names starting with "_" are ignored by pyarrow, pandas, DuckDB and Spark readers of the dataset.

With a table output (output=delta, output=iceberg: app.output.tables) the folder holds the same files but for
the part files and the staging: the rows are the table's, and `committed_files` lists its data files.
"""

import contextlib
import errno
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import uuid
from dataclasses import replace
from typing import TYPE_CHECKING, Optional

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
from omegaconf import OmegaConf

from app import storage
from app.config import AppConfig, ConfigError, OutputConfig, VideoConfig, VideoSampling
from app.model import ModelSpec, torch_build
from app.output import tables
from app.result_schema import RESULT_SCHEMA
from app.retry import with_retries

if TYPE_CHECKING:
    from app.summary import Summary

MANIFEST_NAME = "_manifest.json"
TRANSIENT_NAME = "_transient.parquet"
SETTINGS_NAME = "_settings.json"
STAGING_DIR = "_staging"
LEASE_DIR = "_lease"
PART_PREFIX = "part-"
# Tries of a read of the run's own small files (settings, manifest, lease) that fails for a reason that may pass.
READ_ATTEMPTS = 5
# part-g<generation>-<seq>.parquet, and _lease/<generation>.json
PART_PATTERN = re.compile(rf"{PART_PREFIX}g(\d{{10}})-(\d+)\.parquet")
LEASE_PATTERN = re.compile(r"(\d{10})\.json")


class OutputFull(Exception):
    """The filesystem of output.path has no space left for a file the run must write; one line."""

    def __init__(self, path: str, needed: int, free: Optional[int]):
        room = f", {free} free" if free is not None else ""
        super().__init__(
            f"no space left on the filesystem of {os.path.dirname(path)}: {os.path.basename(path)} needs {needed} "
            f"bytes{room}; free some space (or choose another output.path) and rerun: the rows committed so far are kept"
        )


def is_disk_full(error: OSError) -> bool:
    return error.errno == errno.ENOSPC or "No space left on device" in str(error)


def write_whole(filesystem: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write data as the file at path; when the disk is full, remove what was written and raise OutputFull."""
    try:
        with filesystem.open_output_stream(path) as stream:
            stream.write(data)
    except OSError as error:
        if not is_disk_full(error):
            raise
        with contextlib.suppress(OSError):
            filesystem.delete_file(path)
        free = shutil.disk_usage(os.path.dirname(path)).free if isinstance(filesystem, pafs.LocalFileSystem) else None
        raise OutputFull(path, len(data), free) from error


def replace_file(filesystem: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write the file at path whole: on a local disk under another name first, then renamed over it, so
    that a full disk or a crash never leaves part of it (an S3 PUT is whole by itself)."""
    if not isinstance(filesystem, pafs.LocalFileSystem):
        return write_whole(filesystem, path, data)
    partial = f"{path}.{uuid.uuid4().hex[:8]}.partial"
    write_whole(filesystem, partial, data)
    filesystem.move(partial, path)


def json_bytes(document: dict) -> bytes:
    return json.dumps(document, indent=2, sort_keys=True).encode() + b"\n"


def write_json(filesystem: pafs.FileSystem, path: str, document: dict) -> None:
    replace_file(filesystem, path, json_bytes(document))


def parquet_bytes(table: pa.Table) -> bytes:
    import pyarrow.parquet as pq

    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer)
    return buffer.getvalue().to_pybytes()


def read_json(filesystem: pafs.FileSystem, path: str) -> Optional[dict]:
    """The JSON document at path, or None when there is none. A read that fails for a reason that may pass
    is tried again (app.retry): the S3 client does not retry a GET whose answer fails mid-body."""

    def read() -> Optional[dict]:
        if filesystem.get_file_info(path).type != pafs.FileType.File:
            return None
        with filesystem.open_input_stream(path) as stream:
            return json.loads(stream.read())

    return with_retries(read, READ_ATTEMPTS, path=path)


def locate(section: OutputConfig) -> storage.Location:
    """The folder of the run's files, a filesystem location (a folder, or nothing yet): output.path, or with
    output=delta the table's _ray_detect folder; with a table output it names the table (app.output.tables)."""
    table = tables.table_of(section)
    folder = table.control_uri() if table is not None and table.control_uri() else section.path
    try:
        output = storage.resolve(folder)
        info = output.filesystem.get_file_info(output.path)
    except (storage.StorageError, OSError) as error:
        raise ConfigError(f"output.path {section.path} cannot be used: {error}") from None
    if info.type == pafs.FileType.File:
        raise ConfigError(f"output.path {section.path} is a file, not a directory")
    return replace(output, table=table)


def prepare_table(section: OutputConfig, output: storage.Location, wanted: Optional[dict] = None) -> storage.Location:
    """A table output's table created, or its schema checked (emptied with output.overwrite): called once the
    run holds the lease, before `prepare`. With the settings `wanted`, a table made with other settings is
    refused when the run folder has none of its own to compare (a lost folder, or a new one): `prepare`
    compares them otherwise, naming the setting. The location, naming the table as prepared."""
    if output.table is None:
        return output
    check = wanted is not None and read_json(output.filesystem, output.join(SETTINGS_NAME)) is None
    digest = hashlib.sha256(json_bytes(wanted)).hexdigest() if wanted is not None else None
    return replace(output, table=output.table.prepare(section.overwrite, output.uri(output.path), digest, check))


def output_name(output: storage.Location) -> str:
    """Where the rows are, in words: the Parquet dataset's URI, or the table's name."""
    return output.table.name if output.table is not None else output.uri(output.path)


def rows_filesystem(output: storage.Location) -> pafs.FileSystem:
    """The filesystem of the files committed_files lists."""
    return tables.rows_filesystem(output.table) if output.table is not None else output.filesystem


def settings(cfg: AppConfig, weights: str, weights_sha256: Optional[str] = None) -> dict:
    """The settings the result rows depend on: a run resumes an output.path only if they are equal. (They
    come from four of the config's sections: it takes the whole config, as write_manifest does.)
    `weights` are the ones actually used, so a demo that fell back to random ones is not resumed with
    real ones; `weights_sha256` is the digest of the checkpoint read (app.model.resolve_weights), so that a
    checkpoint replaced at the same path is not resumed with either. model.checkpoint_sha256 is a check
    of those bytes, not one of the settings: a run that sets it resumes one that did not."""
    model = OmegaConf.to_container(cfg.model, resolve=True)
    model["weights"] = weights
    del model["checkpoint_sha256"]
    if weights_sha256 is not None:
        model["weights_sha256"] = weights_sha256
    inputs = {"data.manifest": storage.absolute(cfg.data.manifest)} if cfg.data.manifest else {}
    # Tiling's keys only when it is on: the settings of an untiled run are those of the versions before it.
    tiling = OmegaConf.to_container(cfg.tiling, resolve=True, enum_to_str=True) if cfg.tiling.enabled else {}
    # The table's name only with a table output: a bookkeeping folder stays with the table it was made for.
    table = tables.table_of(cfg.output)
    return {
        **video_settings(cfg.data.video),
        **({"output.table": table.name} if table is not None else {}),
        **{f"tiling.{key}": value for key, value in tiling.items() if key != "enabled"},
        **inputs,
        "data.path": storage.absolute(cfg.data.path),
        "data.max_file_bytes": cfg.data.max_file_bytes,
        "data.max_image_pixels": cfg.data.max_image_pixels,
        "inference.resize_on_cpu": cfg.inference.resize_on_cpu,
        "inference.precision": cfg.inference.precision.value,
        **{f"model.{key}": value for key, value in model.items()},
    }


def video_settings(video: VideoConfig) -> dict:
    """The video settings that choose frames (app.video), those that differ from their defaults alone: the
    settings of a run with the defaults are those of the versions before videos were read."""
    defaults = VideoConfig()
    chosen = {"sample": VideoSampling(video.sample).value, "fps": video.fps, "max_duration_s": video.max_duration_s}
    if chosen["sample"] != VideoSampling.fps.value:
        del chosen["fps"]
    return {f"data.video.{key}": value for key, value in chosen.items()
            if value != (getattr(defaults, key).value if key == "sample" else getattr(defaults, key))}


def prepare(section: OutputConfig, output: storage.Location, wanted: dict) -> None:
    """Prepare output.path, whose lease this run holds: a new dataset, or the resumption of one made with
    the settings `wanted`. Files a crashed run left in staging are discarded; committed rows are kept.
    output.overwrite=true deletes what runs wrote there (never the lease, nor files of anybody else), and
    refuses when output.path is not a ray-detect output or holds data.path."""
    entries = [entry for entry in output.filesystem.get_file_info(pafs.FileSelector(output.path)) if entry.base_name != LEASE_DIR]
    previous = read_json(output.filesystem, output.join(SETTINGS_NAME))
    if section.overwrite and entries:
        check_overwrite(section, output, previous, wanted)
        for entry in entries:
            if entry.type == pafs.FileType.Directory and entry.base_name == STAGING_DIR:
                output.filesystem.delete_dir(entry.path)
            elif entry.type == pafs.FileType.File and written_by_a_run(entry.base_name):
                output.filesystem.delete_file(entry.path)
        entries, previous = [], None
    if previous is None and entries:
        raise not_ours(section)
    if previous is not None and previous != wanted:
        key = next(key for key in sorted(set(wanted) | set(previous)) if wanted.get(key) != previous.get(key))
        raise ConfigError(
            f"output.path {section.path} holds results made with {key}={previous.get(key)!r}, not "
            f"{wanted.get(key)!r}; choose another output.path or pass output.overwrite=true to replace them"
        )
    output.filesystem.delete_dir_contents(output.join(STAGING_DIR), missing_dir_ok=True)
    if previous is None:
        write_json(output.filesystem, output.join(SETTINGS_NAME), wanted)


def written_by_a_run(name: str) -> bool:
    """Whether a file in output.path is one that runs write (a committed file, settings, manifest, list of
    inputs left unread, or one replace_file was writing)."""
    if name.endswith(".partial"):
        name = name.rsplit(".", 2)[0]  # <name>.<random>.partial
    return (name.startswith(PART_PREFIX) and name.endswith(".parquet")) or name in (SETTINGS_NAME, MANIFEST_NAME, TRANSIENT_NAME)


def check_ours(section: OutputConfig, output: storage.Location) -> None:
    """Raise ConfigError when output.path holds files but no ray-detect output (neither settings nor a
    lease); checked before the run takes its lease, so that nothing is left in somebody else's folder.
    The folder is listed only when it has neither: a large output costs two lookups."""
    for name in (SETTINGS_NAME, LEASE_DIR):
        if output.filesystem.get_file_info(output.join(name)).type != pafs.FileType.NotFound:
            return
    if output.filesystem.get_file_info(pafs.FileSelector(output.path, allow_not_found=True)):
        raise not_ours(section)


def not_ours(section: OutputConfig) -> ConfigError:
    if section.overwrite:
        return ConfigError(f"output.path {section.path} is not a ray-detect output (it has no {SETTINGS_NAME}): "
                           f"output.overwrite=true replaces only results; choose another output.path")
    return ConfigError(f"output.path {section.path} holds files that are not ray-detect results; choose another output.path")


def check_overwrite(section: OutputConfig, output: storage.Location, previous: Optional[dict], wanted: dict) -> None:
    """Raise ConfigError unless output.path may be overwritten: it holds a ray-detect output (its settings),
    and not the run's own inputs."""
    if previous is None:
        raise not_ours(section)
    inputs, here = wanted["data.path"], output.uri(output.path).rstrip("/")
    if inputs == here or inputs.startswith(here + "/"):
        raise ConfigError(f"data.path {inputs} lies inside output.path {section.path}: output.overwrite=true is refused "
                          f"there; choose an output.path apart from the inputs")


def part_name(generation: int, sequence: int) -> str:
    return f"{PART_PREFIX}g{generation:010d}-{sequence:06d}.parquet"


def part_files(output: storage.Location) -> dict[str, tuple[int, int]]:
    """Every part-*.parquet file in output.path, counted or not, with its (generation, seq); a name from
    before generations is generation 0."""
    entries = output.filesystem.get_file_info(pafs.FileSelector(output.path, allow_not_found=True))
    names = {entry.path: entry.base_name for entry in entries if entry.type == pafs.FileType.File
             and entry.base_name.startswith(PART_PREFIX) and entry.base_name.endswith(".parquet")}
    return {path: tuple(map(int, match.groups())) if (match := PART_PATTERN.fullmatch(name)) else (0, 0)
            for path, name in names.items()}


def lease_path(output: storage.Location, generation: int) -> str:
    return output.join(LEASE_DIR, f"{generation:010d}.json")


def lease_files(output: storage.Location) -> dict[int, pafs.FileInfo]:
    """The lease files in _lease/, by generation."""
    entries = output.filesystem.get_file_info(pafs.FileSelector(output.join(LEASE_DIR), allow_not_found=True))
    return {
        int(entry.base_name[:10]): entry
        for entry in entries
        if entry.type == pafs.FileType.File and LEASE_PATTERN.fullmatch(entry.base_name)
    }


def read_lease(output: storage.Location, generation: int) -> Optional[dict]:
    """A generation's lease document; None when there is none or it is empty or not a JSON object (its run
    was killed while creating it, or the disk was full). A store's failure raises OSError."""
    try:
        document = read_json(output.filesystem, lease_path(output, generation))
    except ValueError:
        return None
    return document if isinstance(document, dict) else None


def latest_readable_lease(output: storage.Location, generations) -> tuple[int, Optional[dict]]:
    """The highest of generations whose document can be read, and that document; (0, None) when none can."""
    for generation in sorted(generations, reverse=True):
        document = read_lease(output, generation)
        if document is not None:
            return generation, document
    return 0, None


def lease_limits(document: Optional[dict]) -> dict[int, int]:
    """The limits a lease document carries: generation → the first seq of its files that does not count."""
    return {int(generation): int(limit) for generation, limit in ((document or {}).get("limits") or {}).items()}


def sorted_part_files(output: storage.Location) -> tuple[list[str], list[str]]:
    """The part files, sorted into (committed, fenced): fenced are those a zombie writer moved in after its
    generation was taken over (a seq at or above its generation's limit in the latest lease document).
    The files are listed before the lease, so a file listed is of a generation whose lease file exists."""
    files = part_files(output)
    limits = lease_limits(latest_readable_lease(output, lease_files(output))[1])
    committed, fenced = [], []
    for path, (generation, sequence) in sorted(files.items()):
        (committed if sequence < limits.get(generation, sequence + 1) else fenced).append(path)
    return committed, fenced


def committed_files(output: storage.Location) -> list[str]:
    """The files that make the dataset: the one place that decides, for every reader. With a table output,
    the data files of the table's current version (on rows_filesystem)."""
    if output.table is not None:
        return output.table.data_files()
    return sorted_part_files(output)[0]


def read_committed(output: storage.Location, columns: list[str]) -> pa.Table:
    """The given columns of every committed row."""
    files = committed_files(output)
    if not files:
        return RESULT_SCHEMA.empty_table().select(columns)
    dataset = pads.dataset(files, schema=RESULT_SCHEMA, filesystem=rows_filesystem(output), format="parquet")
    return dataset.to_table(columns=columns)


def read_manifest(output: storage.Location) -> Optional[dict]:
    """The manifest of a complete dataset; None while a run has not finished it."""
    return read_json(output.filesystem, output.join(MANIFEST_NAME))


def write_manifest(cfg: AppConfig, spec: ModelSpec, summary: "Summary", output: storage.Location) -> None:
    """Declare the dataset complete: what it holds, how it was made, and what the last run did."""
    import ray  # the job's library, imported here so that the result commands can do without it

    import app
    from app.device import FLOAT32_MATH  # imports ray

    torch = torch_build()
    document = {
        "complete": True,
        # As written: an interpolation such as ${oc.env:...} stays one, so no value from the environment
        # lands here; the values the rows depend on are in the settings.
        "config": OmegaConf.to_container(cfg, resolve=False),
        "versions": {
            "app": app.__version__,
            "ray": ray.__version__,
            "torch": torch.__version__,
            "torch_cuda": torch.cuda,
            "torchvision": importlib.metadata.version("torchvision"),
        },
        "model": {"name": spec.name, "weights": spec.weights, "weights_sha256": spec.weights_sha256,
                  "random_init_fallback": spec.fallback_reason},
        # The table the rows are in, as the run resolved it (readers find it here); null for the Parquet dataset.
        "table": output.table.manifest_entry() if output.table is not None else None,
        # The layers' precision, the float32 arithmetic on a GPU ("ieee", TF32 off: app.device), and the
        # settings that change which convolution algorithms run (the last bits of a detection may differ).
        "numerics": {"precision": cfg.inference.precision.value, "gpu_float32": FLOAT32_MATH,
                     "channels_last": cfg.inference.channels_last, "cudnn_benchmark": cfg.inference.cudnn_benchmark},
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
        "read_retries_by_last_run": summary.read_retries,
        "detector_by_last_run": {
            "actors": summary.detector_actors,
            "nodes": summary.detector_nodes,
            "gpus": summary.detector_gpus,
            "devices": summary.detector_devices,
        },
        # The model batches the last run ran, by their images (JSON keys are strings), against the
        # planned batch size.
        "model_batches_by_last_run": {
            "batch_size": summary.batch_size,
            "batches": sum(summary.model_batches.values()),
            "mean_images": round(summary.mean_model_batch, 3),
            "by_images": {str(size): count for size, count in summary.model_batches.items()},
        },
        "wall_seconds": summary.wall_seconds,
        "images_per_second": summary.images_per_second,
        # The detector's use of its devices, and with inference.gpu_hour_price its cost (app.summary.Summary).
        "cost_by_last_run": {
            "model_seconds": summary.model_seconds,
            "model_busy_share": None if summary.model_busy_share is None else round(summary.model_busy_share, 4),
            "device_busy_share": summary.device_busy_share,
            "images_per_gpu_second": summary.images_per_gpu_second,
            "gpu_hour_price": cfg.inference.gpu_hour_price,
            "per_million_images": summary.cost_per_million_images,
        },
    }
    write_json(output.filesystem, output.join(MANIFEST_NAME), document)
