"""Inputs from data.manifest: a list of image paths made elsewhere, read by Ray tasks, never listed.

Accepted: a Parquet or CSV file, or a folder of them, with a `path` column (and `size`, when known); a CSV
without a header, whose first column is the path (and second the size); or an S3 Inventory report: its
`manifest.json`, whose data files (CSV as AWS writes them, without a header and with URL-encoded keys,
or Parquet) hold bucket and key columns. A report of all versions lists a key once per version and per
delete marker: only the rows of latest versions that are not delete markers are inputs, so each live key
is one. Paths are local paths or URIs of one filesystem, that of the first path; a relative local path is
taken from the manifest's folder. A path whose scheme is not in data.allowed_schemes is an error row,
never opened.
"""

import io
import json
import posixpath
import urllib.parse
from dataclasses import dataclass, replace
from typing import Optional, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray

from app.config import STORAGE_SCHEMES, uri_scheme
from app.listing import Rows
from app.result_schema import UNREADABLE
from app.storage import Location, StorageError, resolve

PARQUET_SUFFIXES = (".parquet", ".pq")
CSV_SUFFIXES = (".csv", ".csv.gz")
INVENTORY_MANIFEST = "manifest.json"
# Columns of a CSV read as text whatever they hold: paths, and the version columns of an S3 Inventory of
# all versions (whose flags would otherwise be typed bool, or null in a file where none is set).
CSV_TEXT_COLUMNS = ("path", "key", "Key", "bucket", "Bucket", "VersionId", "IsLatest", "IsDeleteMarker")


@dataclass(frozen=True)
class Manifest:
    """Where the manifest's files are and how to read them, and where its images are."""

    location: Location  # the manifest's filesystem
    files: list[str]
    format: str  # "parquet" or "csv"
    images: Location  # the images' filesystem; `path` relative to it, user-facing with its prefix
    base: str  # a relative local path is taken from this folder
    csv_columns: Optional[list[str]] = None  # names of a header-less CSV's columns
    url_encoded_keys: bool = False  # S3 Inventory CSV
    # data.allowed_schemes, in lower case: a listed path of another scheme is an error row.
    allowed_schemes: tuple[str, ...] = tuple(STORAGE_SCHEMES)
    # How the listed paths on the images' filesystem begin: its scheme and "://" ("" for local paths).
    # None: images.uri_prefix, which differs only on a filesystem of whole URLs (fsspec's HTTP: prefix "").
    on_images: Optional[str] = None

    def dataset(self, tasks: int) -> ray.data.Dataset:
        """The manifest's rows, read by up to `tasks` Ray tasks at a time. Reading takes no CPU of
        Ray's accounting, like decoding, so that it runs beside detector actors that hold every CPU."""
        paths, filesystem = self.files, self.location.filesystem
        if self.format == "parquet":
            return ray.data.read_parquet(paths, filesystem=filesystem, num_cpus=0, concurrency=tasks)
        read = pacsv.ReadOptions(column_names=self.csv_columns) if self.csv_columns else pacsv.ReadOptions()
        convert = pacsv.ConvertOptions(column_types={name: pa.string() for name in CSV_TEXT_COLUMNS})
        return ray.data.read_csv(paths, filesystem=filesystem, read_options=read, convert_options=convert, num_cpus=0, concurrency=tasks)


def open_manifest(uri: str, allowed_schemes: Sequence[str] = STORAGE_SCHEMES) -> Manifest:
    """Check data.manifest and find its files; raises StorageError with a one-line reason. The images'
    paths may have the schemes of `allowed_schemes` (data.allowed_schemes)."""
    allowed = tuple(scheme.lower() for scheme in allowed_schemes)
    location = resolve(uri)
    info = location.filesystem.get_file_info(location.path)
    if info.type == pafs.FileType.NotFound:
        raise StorageError(f"data.manifest {uri} does not exist")
    if info.base_name == INVENTORY_MANIFEST:
        return replace(open_inventory(uri, location), allowed_schemes=allowed)
    if info.type == pafs.FileType.Directory:
        entries = location.filesystem.get_file_info(pafs.FileSelector(location.path, recursive=True))
        files = sorted(e.path for e in entries if e.type == pafs.FileType.File and not e.base_name.startswith(("_", ".")))
        base = location.path
    else:
        files, base = [location.path], posixpath.dirname(location.path)
    formats = {("parquet" if name.lower().endswith(PARQUET_SUFFIXES) else "csv" if name.lower().endswith(CSV_SUFFIXES) else None)
               for name in files}
    if not files or None in formats or len(formats) > 1:
        raise StorageError(f"data.manifest {uri} must be Parquet or CSV files (.parquet, .csv, .csv.gz), all of one kind")
    (fmt,) = formats
    columns, first, header = first_row(location.filesystem, files[0], fmt)
    if "path" not in columns:
        raise StorageError(f"data.manifest {uri} has no `path` column (columns: {', '.join(columns)})")
    images, on_images = images_location(str(first["path"]) if first else "", allowed)
    return Manifest(location, files, fmt, images, base, csv_columns=None if header else columns, allowed_schemes=allowed,
                    on_images=on_images)


def open_inventory(uri: str, location: Location) -> Manifest:
    """An S3 Inventory report: manifest.json lists data files under the report's data/ folder."""
    with location.filesystem.open_input_stream(location.path) as stream:
        report = json.loads(stream.read())
    fmt = str(report.get("fileFormat", "")).lower()
    if fmt not in ("csv", "parquet"):
        raise StorageError(f"data.manifest {uri}: S3 Inventory format {report.get('fileFormat')!r} is not supported (CSV or Parquet)")
    # The report's root is two folders above manifest.json (<root>/<date>/manifest.json, <root>/data/...).
    root = posixpath.dirname(posixpath.dirname(location.path))
    files = [posixpath.join(root, *entry["key"].split("/")[-2:]) for entry in report.get("files", [])]
    columns = [name.strip() for name in report.get("fileSchema", "").split(",")] if fmt == "csv" else None
    if fmt == "csv" and not {"Bucket", "Key"} <= set(columns or []):
        raise StorageError(f"data.manifest {uri}: its fileSchema has no Bucket and Key columns")
    source = report.get("sourceBucket", "")
    images = location if location.uri_prefix == "s3://" else resolve(f"s3://{source}")
    return Manifest(location, files, fmt, Location(images.filesystem, "", "s3://"), "", columns, url_encoded_keys=fmt == "csv")


def first_row(filesystem: pafs.FileSystem, path: str, fmt: str) -> tuple[list[str], Optional[dict], bool]:
    """The column names of a manifest file, its first row, and whether it has a header. A CSV whose
    first field is not `path` has none: its columns are path, size and others (_2, _3, ...)."""
    if fmt == "parquet":
        with filesystem.open_input_file(path) as file:
            reader = pq.ParquetFile(file)
            batch = next(reader.iter_batches(batch_size=1), None)
            return reader.schema_arrow.names, batch.to_pylist()[0] if batch is not None and batch.num_rows else None, True
    with filesystem.open_input_stream(path, compression="detect") as stream:
        head = stream.read(64 * 1024)
    lines = [line for line in head.split(b"\n")[:2] if line.strip()]
    if not lines:
        return ["path"], None, False
    table = pacsv.read_csv(io.BytesIO(b"\n".join(lines)), pacsv.ReadOptions(autogenerate_column_names=True),
                           convert_options=pacsv.ConvertOptions(strings_can_be_null=False))
    rows = [[str(value) for value in row.values()] for row in table.to_pylist()]
    if rows[0][0].strip().lower() == "path":
        names = [name.strip() for name in rows[0]]
        return names, dict(zip(names, rows[1])) if len(rows) > 1 else None, True
    names = ["path", "size", *(f"_{i}" for i in range(2, len(rows[0])))][: len(rows[0])]
    return names, dict(zip(names, rows[0])), False


def images_location(first_path: str, allowed_schemes: Sequence[str]) -> tuple[Location, str]:
    """The filesystem of the images, that of the first path, and how its paths begin (Manifest.on_images).
    One of a scheme not allowed is not made: its paths are error rows, and the others are not on it."""
    if "://" not in first_path:
        return Location(pafs.LocalFileSystem(), "", ""), ""
    prefix = first_path.split("://", 1)[0] + "://"
    if uri_scheme(first_path) not in allowed_schemes:
        # Never opened: manifest_rows refuses its paths, and the rows keep them whole (no prefix added).
        return Location(pafs.LocalFileSystem(), "", ""), prefix
    found = resolve(first_path)
    # fsspec's HTTP filesystem takes whole URLs: its paths keep their scheme.
    return Location(found.filesystem, "", "" if found.path.startswith(prefix) else prefix), prefix


def flag(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """A true/false column as booleans: bool as it is; text "true" or "false" in any case, anything else null."""
    if pa.types.is_boolean(column.type):
        return column
    text = pc.utf8_lower(pc.utf8_trim_whitespace(column.cast(pa.string())))
    unknown = pa.scalar(None, pa.bool_())
    return pc.if_else(pc.equal(text, "true"), True, pc.if_else(pc.equal(text, "false"), False, unknown))


def live_versions(batch: pa.Table) -> pa.Table:
    """The rows of latest versions that are not delete markers, when the batch has S3 Inventory's version
    columns (IsLatest and IsDeleteMarker in CSV, is_latest and is_delete_marker in Parquet); else all its
    rows. A row without a flag's value is not dropped for it."""
    names = {name.lower().replace("_", ""): name for name in batch.column_names}
    keep = None
    if "islatest" in names:
        keep = pc.fill_null(flag(batch.column(names["islatest"])), True)
    if "isdeletemarker" in names:
        live = pc.invert(pc.fill_null(flag(batch.column(names["isdeletemarker"])), False))
        keep = live if keep is None else pc.and_(keep, live)
    return batch if keep is None else batch.filter(keep)


def manifest_rows(batch: pa.Table, *, manifest: Manifest, suffixes: tuple[str, ...]) -> pa.Table:
    """Ray Data UDF: rows of a manifest file in, input rows (app.listing.INPUT_SCHEMA) of its images out
    (of an S3 Inventory of all versions, those of live keys only: live_versions)."""
    batch = live_versions(batch)
    names = {name.lower(): name for name in batch.column_names}
    if "path" in names:
        paths = batch.column(names["path"]).to_pylist()
    else:
        keys = batch.column(names["key"]).to_pylist()
        if manifest.url_encoded_keys:
            keys = [urllib.parse.unquote_plus(key) for key in keys]
        paths = [f"s3://{bucket}/{key}" for bucket, key in zip(batch.column(names["bucket"]).to_pylist(), keys)]
    sizes = batch.column(names["size"]).cast(pa.int64()).to_pylist() if "size" in names else [None] * len(paths)
    prefix = manifest.images.uri_prefix
    on_images = prefix if manifest.on_images is None else manifest.on_images
    rows = Rows()
    for path, size in zip(paths, sizes):
        if path is None or not path.lower().endswith(suffixes):
            continue
        if uri_scheme(path) not in manifest.allowed_schemes:
            rows.add(path, kind=UNREADABLE, error=f"its scheme {uri_scheme(path)!r} is not in data.allowed_schemes")
        elif on_images and path.startswith(on_images):
            rows.add(path[len(prefix) :], size)
        elif on_images or "://" in path:
            rows.add(path, kind=UNREADABLE, error=f"not on the filesystem of the manifest's first path ({on_images or 'local'})")
        else:
            rows.add(path if path.startswith("/") else posixpath.join(manifest.base, path), size)
    return rows.table()
