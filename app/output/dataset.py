"""The output dataset: one Parquet row per input image, committed file by file, and the run manifest.

Layout of output.path (the commit protocol):
  part-<run>-<seq>.parquet  committed rows. Each file is written whole under _staging/ and then moved
                            here in one step, so readers never see a half-written file (writer.py).
  _settings.json            what the rows depend on, written when the first run starts. A later run on
                            the same output.path resumes only with the same settings.
  _staging/                 files being written; anything left there by a crashed run is discarded.
  _manifest.json            written last, when every input has its row: a directory without it is an
                            incomplete run (`read_manifest` is the one place that decides).
  _lease.json               the lease of the run writing here now, if any (lease.py).
  _transient.parquet        the inputs the last run could not read because storage kept failing for
                            reasons that may pass (path, error); they have no row, and a rerun reads them.
Names starting with "_" are ignored by pyarrow, pandas, DuckDB and Spark readers of the dataset.
"""

import contextlib
import errno
import importlib.metadata
import importlib.util
import json
import os
import shutil
import types
import uuid
from typing import TYPE_CHECKING, Optional

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
from omegaconf import OmegaConf

from app import storage
from app.config import AppConfig, ConfigError, OutputConfig

if TYPE_CHECKING:
    from app.model import ModelSpec
    from app.summary import Summary

RESULT_SCHEMA = pa.schema(
    [
        ("path", pa.string()),  # the input file's path or URI
        ("width", pa.int32()),  # original size in pixels, after EXIF orientation; null on error
        ("height", pa.int32()),
        ("boxes", pa.list_(pa.list_(pa.float32()))),  # [x1, y1, x2, y2] per detection, original pixels
        ("scores", pa.list_(pa.float32())),
        ("labels", pa.list_(pa.int64())),
        ("label_names", pa.list_(pa.string())),
        ("num_detections", pa.int32()),
        # Model inputs the image took: 1 untiled; with tiling=tiles its tiles, plus 1 for the whole-image
        # pass; 0 on error. Null in rows written before the column existed.
        ("num_tiles", pa.int32()),
        ("error_kind", pa.string()),  # null on success; one of the kinds below
        ("error", pa.string()),
    ]
)

# Error kinds, as they appear in the `error_kind` column and the run summary.
EMPTY_FILE = "empty_file"
TOO_LARGE = "too_large"
UNREADABLE = "unreadable"
NOT_AN_IMAGE = "not_an_image"
TOO_MANY_PIXELS = "too_many_pixels"
CORRUPT_IMAGE = "corrupt_image"
NOT_A_FILE = "not_a_file"  # a FIFO, socket, device or folder named like an image: never opened
# A read that kept failing for a reason that may pass (app.retry): never committed, so a rerun reads it again.
TRANSIENT = "transient"

MANIFEST_NAME = "_manifest.json"
TRANSIENT_NAME = "_transient.parquet"
SETTINGS_NAME = "_settings.json"
STAGING_DIR = "_staging"
LEASE_NAME = "_lease.json"
PART_PREFIX = "part-"


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
    """The JSON document at path, or None when there is none."""
    if filesystem.get_file_info(path).type != pafs.FileType.File:
        return None
    with filesystem.open_input_stream(path) as stream:
        return json.loads(stream.read())


def locate(section: OutputConfig) -> storage.Location:
    """output.path as a filesystem location: a folder, or nothing yet."""
    try:
        output = storage.resolve(section.path)
        info = output.filesystem.get_file_info(output.path)
    except (storage.StorageError, OSError) as error:
        raise ConfigError(f"output.path {section.path} cannot be used: {error}") from None
    if info.type == pafs.FileType.File:
        raise ConfigError(f"output.path {section.path} is a file, not a directory")
    return output


def settings(cfg: AppConfig, weights: str) -> dict:
    """The settings the result rows depend on: a run resumes an output.path only if they are equal. (They
    come from four of the config's sections: it takes the whole config, as write_manifest does.)
    `weights` are the ones actually used, so a demo that fell back to random ones is not resumed with
    real ones."""
    model = OmegaConf.to_container(cfg.model, resolve=True)
    model["weights"] = weights
    inputs = {"data.manifest": storage.absolute(cfg.data.manifest)} if cfg.data.manifest else {}
    # Tiling's keys only when it is on: the settings of an untiled run are those of the versions before it.
    tiling = OmegaConf.to_container(cfg.tiling, resolve=True, enum_to_str=True) if cfg.tiling.enabled else {}
    return {
        **{f"tiling.{key}": value for key, value in tiling.items() if key != "enabled"},
        **inputs,
        "data.path": storage.absolute(cfg.data.path),
        "data.max_file_bytes": cfg.data.max_file_bytes,
        "data.max_image_pixels": cfg.data.max_image_pixels,
        "inference.resize_on_cpu": cfg.inference.resize_on_cpu,
        "inference.precision": cfg.inference.precision.value,
        **{f"model.{key}": value for key, value in model.items()},
    }


def prepare(section: OutputConfig, output: storage.Location, wanted: dict) -> None:
    """Prepare output.path, whose lease this run holds: a new dataset, or the resumption of one made with
    the settings `wanted`. Files a crashed run left in staging are discarded; committed rows are kept."""
    entries = [entry for entry in output.filesystem.get_file_info(pafs.FileSelector(output.path)) if entry.base_name != LEASE_NAME]
    if section.overwrite:
        for entry in entries:
            if entry.type == pafs.FileType.Directory:
                output.filesystem.delete_dir(entry.path)
            else:
                output.filesystem.delete_file(entry.path)
        entries = []
    previous = read_json(output.filesystem, output.join(SETTINGS_NAME))
    if previous is None and entries:
        raise ConfigError(
            f"output.path {section.path} holds files that are not ray-detect results; "
            f"choose another output.path or pass output.overwrite=true to replace its contents"
        )
    if previous is not None and previous != wanted:
        key = next(key for key in sorted(set(wanted) | set(previous)) if wanted.get(key) != previous.get(key))
        raise ConfigError(
            f"output.path {section.path} holds results made with {key}={previous.get(key)!r}, not "
            f"{wanted.get(key)!r}; choose another output.path or pass output.overwrite=true to replace them"
        )
    output.filesystem.delete_dir_contents(output.join(STAGING_DIR), missing_dir_ok=True)
    if previous is None:
        write_json(output.filesystem, output.join(SETTINGS_NAME), wanted)


def committed_files(output: storage.Location) -> list[str]:
    entries = output.filesystem.get_file_info(pafs.FileSelector(output.path, allow_not_found=True))
    return sorted(
        entry.path
        for entry in entries
        if entry.type == pafs.FileType.File
        and entry.base_name.startswith(PART_PREFIX)
        and entry.base_name.endswith(".parquet")
    )


def read_committed(output: storage.Location, columns: list[str]) -> pa.Table:
    """The given columns of every committed row."""
    files = committed_files(output)
    if not files:
        return RESULT_SCHEMA.empty_table().select(columns)
    dataset = pads.dataset(files, schema=RESULT_SCHEMA, filesystem=output.filesystem, format="parquet")
    return dataset.to_table(columns=columns)


def record_transient(output: storage.Location, left: Optional[pa.Table]) -> None:
    """List the inputs a run left unread (path, error) in TRANSIENT_NAME, or remove the list when none are."""
    path = output.join(TRANSIENT_NAME)
    if left is not None and left.num_rows:
        replace_file(output.filesystem, path, parquet_bytes(left))
    elif output.filesystem.get_file_info(path).type != pafs.FileType.NotFound:
        output.filesystem.delete_file(path)


def read_manifest(output: storage.Location) -> Optional[dict]:
    """The manifest of a complete dataset; None while a run has not finished it."""
    return read_json(output.filesystem, output.join(MANIFEST_NAME))


def torch_build() -> types.ModuleType:
    """torch's torch/version.py (its __version__ and the CUDA it was built for, `cuda`), loaded alone:
    importing torch would cost the driver seconds and hundreds of MB that only the actors need
    (app.detector_stage)."""
    path = importlib.metadata.distribution("torch").locate_file("torch/version.py")
    spec = importlib.util.spec_from_file_location("ray_detect_torch_build", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_manifest(cfg: AppConfig, spec: "ModelSpec", summary: "Summary", output: storage.Location) -> None:
    """Declare the dataset complete: what it holds, how it was made, and what the last run did."""
    import ray  # the job's library, imported here so that the result commands can do without it

    import app

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
        "read_retries_by_last_run": summary.read_retries,
        "detector_by_last_run": {
            "actors": summary.detector_actors,
            "nodes": summary.detector_nodes,
            "gpus": summary.detector_gpus,
            "devices": summary.detector_devices,
        },
        "wall_seconds": summary.wall_seconds,
        "images_per_second": summary.images_per_second,
    }
    write_json(output.filesystem, output.join(MANIFEST_NAME), document)
