"""Reading a finished results directory back, for the report, export and evaluate commands.

A results directory counts as finished when its manifest exists (app.output.dataset.read_manifest): the
job writes `_manifest.json` last, after every Parquet file is in place. A Delta table's folder is read as
its results (its run files are in its _ray_detect folder); an Iceberg output is read from its run folder
(output.path), whose manifest names the catalog and the table (app.output.tables).
"""

import functools
import posixpath
from dataclasses import dataclass, replace
from typing import Optional

import pyarrow as pa
import pyarrow.fs as pafs
from PIL import Image

from app import storage
from app.config import ConfigError, DataConfig, image_formats
from app.decode import DecodeOptions, decode, read_file
from app.output import tables
from app.output.dataset import MANIFEST_NAME, SETTINGS_NAME, read_committed, read_json, read_manifest
from app.result_schema import RESULT_SCHEMA

# Placeholders in torchvision's COCO label list: the background class and the ids COCO left unused.
NOT_A_CATEGORY = ("__background__", "N/A")


class ResultsError(Exception):
    """A results directory (or another input) that cannot be used; the message is one line."""


@dataclass
class Results:
    """A results directory: where it is, its manifest, its settings and its rows (sorted by path)."""

    location: storage.Location
    manifest: dict
    table: pa.Table
    settings: dict

    def image_limits(self) -> DecodeOptions:
        """The limits the job read its images under (data.max_file_bytes, data.max_image_pixels, and the
        formats of data.extensions, from the manifest's config), for reading them again; the defaults for a
        dataset whose settings do not say."""
        defaults = DataConfig(path="")
        extensions = ((self.manifest.get("config") or {}).get("data") or {}).get("extensions")
        extensions = extensions if isinstance(extensions, list) and extensions else defaults.extensions
        return DecodeOptions(
            max_file_bytes=self.settings.get("data.max_file_bytes", defaults.max_file_bytes),
            max_image_pixels=self.settings.get("data.max_image_pixels", defaults.max_image_pixels),
            formats=image_formats(extensions),
        )

    @property
    def uri(self) -> str:
        """The results as named on the command line: the folder, or the Delta table."""
        if isinstance(self.location.table, tables.DeltaTable):
            return self.location.table.uri
        return self.location.uri(self.location.path)

    def rows(self) -> list[dict]:
        return self.table.to_pylist()


def open_results(uri: str) -> Results:
    """Load the manifest and every row of a finished results directory, or raise ResultsError."""
    try:
        location = storage.resolve(uri)
        info = location.filesystem.get_file_info(location.path)
    except (storage.StorageError, OSError) as error:
        raise ResultsError(f"cannot open results directory {uri}: {error}") from None
    if info.type == pafs.FileType.NotFound:
        raise ResultsError(f"results directory {uri} does not exist")
    if info.type != pafs.FileType.Directory:
        raise ResultsError(f"{uri} is not a results directory (it is a file)")
    try:
        location = run_folder(location, uri)
        manifest = read_manifest(location)
        if manifest is None:
            raise ResultsError(f"{uri} has no {MANIFEST_NAME}: not the output of a finished `python -m app` run")
        location = with_iceberg_table(location, manifest, uri)
        # Only the committed part-*.parquet files: not _staging/, _settings.json or anything else there.
        table = read_committed(location, RESULT_SCHEMA.names).sort_by("path")
        settings = read_json(location.filesystem, location.join(SETTINGS_NAME)) or {}
    except (OSError, ValueError, pa.ArrowException, ConfigError) as error:
        raise ResultsError(f"cannot read results in {uri}: {error}") from None
    return Results(location, manifest, table, settings)


def run_folder(location: storage.Location, uri: str) -> storage.Location:
    """The folder of a run's files: the results directory itself, or a Delta table's _ray_detect folder
    (naming the table)."""
    if location.filesystem.get_file_info(location.join("_delta_log")).type != pafs.FileType.Directory:
        return location
    table = tables.DeltaTable(storage.absolute(uri))
    return replace(storage.resolve(table.control_uri()), table=table)


def with_iceberg_table(location: storage.Location, manifest: dict, uri: str) -> storage.Location:
    """The run folder of an Iceberg output named with its table (as its manifest records it); any other folder
    as it is. A table that cannot be read is a ResultsError (a catalog not configured here, a table dropped)."""
    entry = manifest.get("table") or {}
    if entry.get("format") != tables.OutputFormat.iceberg.value:
        return location
    try:
        return replace(location, table=tables.table_from_manifest(entry).located())
    except Exception as error:  # pyiceberg's and its catalogs' own errors, and ConfigError
        raise ResultsError(f"cannot read the table of {uri}: {error}") from None


def output_location(results: Results, uri: str, option: str = "--out") -> storage.Location:
    """Where a command writes, refused inside the results directory: readers of the dataset would take
    the files there for data."""
    try:
        location = storage.resolve(uri)
    except storage.StorageError as error:
        raise ResultsError(f"cannot write to {option} {uri}: {error}") from None
    inside = location.path == results.location.path or location.path.startswith(results.location.path.rstrip("/") + "/")
    if inside and type(location.filesystem) is type(results.location.filesystem):
        raise ResultsError(f"{option} {uri} is inside the results directory {results.uri}; choose another place")
    return location


def uses_torchvision_labels(manifest: dict) -> bool:
    """Whether the run's labels are torchvision's COCO label set (pretrained or random-init weights with
    no classes of their own), rather than a fine-tuned checkpoint's."""
    from app.model import (  # torch: imported only once needed, so errors come fast
        PRETRAINED,
        RANDOM_INIT,
    )

    model_config = manifest.get("config", {}).get("model", {})
    weights = str(manifest.get("model", {}).get("weights", model_config.get("weights", "")))
    own_classes = model_config.get("class_names") or model_config.get("num_classes")
    return weights in (PRETRAINED, RANDOM_INIT) and not own_classes


def categories(results: Results) -> dict[int, str]:
    """The run's categories, label id → name.

    With torchvision's label set: every COCO category of the model's metadata, under its COCO id.
    With a checkpoint (or configured class names): the distinct (label, label_name) pairs in the rows,
    since the manifest does not record the checkpoint's class list.
    """
    if uses_torchvision_labels(results.manifest):
        from app.model import coco_categories

        names = coco_categories(results.manifest["model"]["name"])
        return {label: name for label, name in enumerate(names) if name not in NOT_A_CATEGORY}
    found = {}
    for labels, names in zip(results.table.column("labels").to_pylist(), results.table.column("label_names").to_pylist()):
        found.update(zip(labels, names))
    return dict(sorted(found.items()))


def file_stem(path: str) -> str:
    """An image's name without folder and extension: how rows are matched with ground truth. A video's
    frame is named by its video and time, as frame_name gives it: "clip.mp4#t=12.345" has the stem
    "clip#t=12.345"."""
    path, time = path.split(FRAME_TIME, 1) if FRAME_TIME in path else (path, None)
    stem = posixpath.splitext(posixpath.basename(path.replace("\\", "/")))[0]
    return stem if time is None else f"{stem}{FRAME_TIME}{float(time):.3f}"


# How a video's frame is named: the video's path, then its time in seconds (a media fragment, as in
# "clip.mp4#t=12.345").
FRAME_TIME = "#t="


def frame_name(row: dict) -> str:
    """A row's name: its image's path, or its video's path and frame time."""
    if row.get("frame_time_s") is None:
        return row["path"]
    return f"{row['path']}{FRAME_TIME}{row['frame_time_s']:.3f}"


def common_folder(paths: list[str]) -> str:
    """The longest folder prefix ("s3://bucket/a/") shared by all paths, with its trailing slash."""
    if not paths:
        return ""
    split = [path.split("/")[:-1] for path in paths]
    common = split[0]
    for parts in split[1:]:
        size = 0
        while size < min(len(common), len(parts)) and common[size] == parts[size]:
            size += 1
        common = common[:size]
    return "/".join(common) + "/" if common else ""


@functools.lru_cache(maxsize=256)
def _folder(uri: str) -> storage.Location:
    return storage.resolve(uri)


def read_bytes(uri: str, limits: DecodeOptions) -> bytes:
    """The bytes of a local file or a file behind a URI (one filesystem per folder, reused), refused
    (app.decode.ImageError) over limits.max_file_bytes."""
    folder, slash, name = uri.rpartition("/")
    location = _folder(folder or (slash or "."))
    return read_file(location.filesystem, location.join(name), None, limits)


def write_bytes(location: storage.Location, path: str, data: bytes) -> None:
    with location.filesystem.open_output_stream(path) as stream:
        stream.write(data)


def read_image(uri: str, limits: DecodeOptions, frame_time_s: Optional[float] = None) -> Image.Image:
    """An input image as the job saw it (app.decode): EXIF orientation applied, 8-bit RGB, original size;
    read and decoded under the job's limits (Results.image_limits), since the file may have changed. With
    frame_time_s, the frame of the video at `uri` of that time (app.video)."""
    if frame_time_s is not None:
        from app import video

        folder, slash, name = uri.rpartition("/")
        location = _folder(folder or (slash or "."))
        return video.read_frame(location.filesystem, location.join(name), frame_time_s)
    return decode(read_bytes(uri, limits), limits)[0]
