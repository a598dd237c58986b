"""Lakehouse table outputs: the result rows committed into a Delta Lake table (output=delta, the deltalake
library) or an Apache Iceberg table (output=iceberg, pyiceberg) instead of a folder of Parquet files.

What stays as it is: the run's bookkeeping, in a folder of its own (app.output.dataset's protocol: the
lease, the settings, the manifest, the inputs left unread). For a Delta table that folder is
`<table>/_ray_detect` (Delta's readers and VACUUM skip names that start with "_"); for an Iceberg table it is
output.path, since Iceberg's orphan-file clean-up would delete anything under the table's location that its
metadata does not name; the table records that folder (RUN_FOLDER_KEY) and refuses runs through another,
whose lease could not keep them apart. The driver is still the only writer.

What changes: a commit of rows (up to output.rows_per_file, or what came within output.commit_interval_s)
is one table transaction that appends one data file, with the run's id and lease generation in its commit
metadata (Delta's commitInfo, Iceberg's snapshot summary). The table's readers see every row of a commit or
none. Each commit expects the table at the version this run left it: a commit that finds it moved by another
writer stops the run as a lost lease does (app.output.lease.LeaseLost).
- Delta: the commit is tried once (max_commit_retries=0) from the run's own snapshot of the table, so a
  version that another writer took makes it fail, and nothing of it is in the table.
- Iceberg: the table is read again before each commit, and a snapshot that is not the run's own stops the
  run before it writes; the commit itself asserts that snapshot, and the table's commit.retry.num-retries
  is 0 (set by the run), so that pyiceberg does not append on top of a concurrent commit instead.
Resume reads the data files of the table's current version (the `path` column, as for the Parquet files):
this app only appends and deletes rows copy-on-write, so the files hold exactly the rows; an Iceberg table
with delete files (another engine's merge-on-read deletes) is refused until it is compacted.
The schema is the result schema, unpartitioned (see docs/outputs.md), created on the first run and checked
against an existing table before any work.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import urllib.parse
from dataclasses import asdict, dataclass
from typing import Optional, Protocol

import pyarrow as pa
import pyarrow.fs as pafs

from app import storage
from app.config import ConfigError, OutputConfig, OutputFormat
from app.result_schema import RESULT_SCHEMA

log = logging.getLogger(__name__)

# The folder of a Delta table's run bookkeeping, inside the table's own folder.
DELTA_CONTROL_DIR = "_ray_detect"
# The commit metadata each commit carries.
RUN_ID_KEY = "ray-detect.run-id"
GENERATION_KEY = "ray-detect.lease-generation"
# The Iceberg table property naming the run folder (output.path) whose lease guards the table: one per table,
# so that the lease keeps one writer on it.
RUN_FOLDER_KEY = "ray-detect.run-folder"
# Iceberg's table property for the retries of a commit that meets a concurrent one: none, so that such a
# commit fails (TableMoved) instead of landing on top of the other writer's.
ICEBERG_RETRIES_KEY = "commit.retry.num-retries"
# The Iceberg table property holding the SHA-256 of the settings its rows were made with (the run folder's
# _settings.json): a run through a lost or new folder is checked against it.
SETTINGS_KEY = "ray-detect.settings-sha256"
# The Iceberg catalog that needs no configuration: a SQL catalog on SQLite and a warehouse under ./iceberg.
EMBEDDED_CATALOG = "local"
EMBEDDED_CATALOG_DIR = "iceberg"


class TableMoved(Exception):
    """Another writer committed to the table while this run wrote it."""


class RowTable(Protocol):
    """What a table output is to the rest of the app: DeltaTable and IcebergTable below. The Parquet dataset's
    side of the same (its part files, their commit and fence) is app.output.dataset's and app.output.writer's;
    the run folder's protocol (lease, settings, manifest) is the same for all three.
    - prepare: made, or checked, once the run holds its lease (app.output.dataset.prepare_table);
    - version, append, delete_rows: commits from the version the run left, TableMoved otherwise
      (app.output.writer.TableWriter);
    - data_files, files_root: what resume, the summary and the readers scan (app.output.dataset.committed_files);
    - control_uri: the run folder when it is the table's own (Delta), else None (output.path);
    - manifest_entry: the table as the manifest records it for readers (table_from_manifest)."""

    @property
    def name(self) -> str: ...

    def prepare(self, overwrite: bool, run_folder: str, settings_digest: Optional[str] = None,
                check_settings: bool = False) -> "RowTable": ...

    def version(self) -> Optional[int]: ...

    def append(self, rows: pa.Table, expected: Optional[int], metadata: dict[str, str]) -> int: ...

    def delete_rows(self, error_kinds: list[str], expected: Optional[int]) -> tuple[int, Optional[int]]: ...

    def data_files(self) -> list[str]: ...

    def files_root(self) -> str: ...

    def control_uri(self) -> Optional[str]: ...

    def manifest_entry(self) -> dict: ...


def type_name(data_type: pa.DataType) -> str:
    """A column's type as the formats keep it: string for (large_)string, list<...> whatever its item's name."""
    if pa.types.is_string(data_type) or pa.types.is_large_string(data_type):
        return "string"
    if pa.types.is_list(data_type) or pa.types.is_large_list(data_type):
        return f"list<{type_name(data_type.value_type)}>"
    return str(data_type)


def schema_problem(table_name: str, schema: pa.Schema) -> Optional[str]:
    """Why an existing table cannot take the result rows (a ConfigError's line), or None."""
    found = [(field.name, type_name(field.type)) for field in schema]
    wanted = [(field.name, type_name(field.type)) for field in RESULT_SCHEMA]
    if found == wanted:
        return None
    for position, (have, want) in enumerate(zip(found + [None] * len(wanted), wanted + [None] * len(found))):
        if have != want:
            break
    what = (f"column {position + 1} is {have[0]} {have[1]}" if have else f"it has {len(found)} columns") + \
        (f", not {want[0]} {want[1]}" if want else f", not the {len(wanted)} of the result schema")
    return (f"output table {table_name} does not have the result schema ({what}); choose another table, or drop "
            f"this one to have the run create it")


def path_on_filesystem(uri: str) -> str:
    """A data file's URI as a path on its filesystem: s3://bucket/key -> bucket/key, file:///a/b -> /a/b."""
    if uri.startswith("file://"):
        return uri[len("file://"):]
    return uri.split("://", 1)[1] if "://" in uri else uri


@dataclass(frozen=True)
class DeltaTable:
    """A Delta Lake table at a path or URI (its storage credentials from the environment, as deltalake reads
    them). Picklable: it holds no connection."""

    uri: str

    @property
    def name(self) -> str:
        return f"delta table {self.uri}"

    def storage_options(self) -> Optional[dict[str, str]]:
        # S3 commits are made safe by conditional writes (If-None-Match on the log's next file), not by a lock.
        return {"conditional_put": "etag"} if self.uri.startswith("s3://") else None

    def open(self, version: Optional[int] = None):
        from deltalake import DeltaTable as Delta

        return Delta(self.uri, version=version, storage_options=self.storage_options())

    def exists(self) -> bool:
        from deltalake import DeltaTable as Delta

        return Delta.is_deltatable(self.uri, storage_options=self.storage_options())

    def prepare(self, overwrite: bool, run_folder: str, settings_digest: Optional[str] = None,
                check_settings: bool = False) -> "DeltaTable":
        """Create the table, or check the existing one's schema (and with overwrite, delete its rows). Its run
        folder, with the settings, is inside it: one per table (deltalake takes no custom table property to
        hold the settings' digest)."""
        from deltalake import DeltaTable as Delta

        if not self.exists():
            Delta.create(self.uri, schema=RESULT_SCHEMA, mode="error", storage_options=self.storage_options())
            log.info("created %s", self.name)
            return self
        table = self.open()
        problem = schema_problem(self.uri, pa.schema(table.schema().to_arrow()))
        if problem:
            raise ConfigError(problem)
        if overwrite:
            table.delete()
        return self

    def version(self) -> int:
        return self.open().version()

    def data_files(self) -> list[str]:
        # deltalake gives the files' URIs percent-encoded (a space as %20).
        return [urllib.parse.unquote(path_on_filesystem(uri)) for uri in self.open().file_uris()]

    def append(self, rows: pa.Table, expected: int, metadata: dict[str, str]) -> int:
        """Append rows in one commit made from version `expected`; the version made. Raises TableMoved when
        another writer made a version after `expected`, before or while this commit was made."""
        from deltalake import CommitProperties, write_deltalake
        from deltalake.exceptions import CommitFailedError

        table = self.open(expected)
        try:
            write_deltalake(table, rows, mode="append",
                            commit_properties=CommitProperties(custom_metadata=metadata, max_commit_retries=0))
        except CommitFailedError as error:
            raise TableMoved(f"{self.name} has versions after {expected} that this run did not make ({error})") from error
        return table.version()

    def delete_rows(self, error_kinds: list[str], expected: int) -> tuple[int, int]:
        """Delete the rows with these error kinds (data.retry_errors) in one commit from version `expected`:
        the number deleted and the version made. Raises TableMoved as append does."""
        from deltalake import CommitProperties
        from deltalake.exceptions import CommitFailedError

        kinds = ", ".join("'" + kind.replace("'", "''") + "'" for kind in error_kinds)
        table = self.open(expected)
        try:
            metrics = table.delete(f"error_kind IN ({kinds})", commit_properties=CommitProperties(max_commit_retries=0))
        except CommitFailedError as error:
            raise TableMoved(f"{self.name} has versions after {expected} that this run did not make ({error})") from error
        return int(metrics.get("num_deleted_rows", 0)), table.version()

    def control_uri(self) -> str:
        return self.uri.rstrip("/") + "/" + DELTA_CONTROL_DIR

    def manifest_entry(self) -> dict:
        """What the manifest records of the table, for readers (app.output.reader)."""
        return {"format": "delta", **asdict(self)}

    def files_root(self) -> str:
        return self.uri


def catalog_properties(name: str, embedded_folder: str = "") -> dict:
    """The properties of the pyiceberg catalog `name`: from pyiceberg's configuration (~/.pyiceberg.yaml, or
    PYICEBERG_CATALOG__<NAME>__* variables) as they are now; for EMBEDDED_CATALOG without a configuration, a
    SQL catalog on SQLite with its warehouse, both in embedded_folder (by default ./iceberg)."""
    from pyiceberg.utils.config import Config

    configured = Config().get_catalog_config(name)
    if configured:
        return configured
    if name != EMBEDDED_CATALOG:
        raise ConfigError(f"output.catalog={name!r} is not configured for pyiceberg: define it in ~/.pyiceberg.yaml or "
                          f"with PYICEBERG_CATALOG__{name.upper()}__URI (and its other properties), or use "
                          f"output.catalog={EMBEDDED_CATALOG} (SQLite under ./{EMBEDDED_CATALOG_DIR})")
    folder = embedded_folder or os.path.abspath(EMBEDDED_CATALOG_DIR)
    os.makedirs(folder, exist_ok=True)
    return {"type": "sql", "uri": f"sqlite:///{folder}/catalog.db", "warehouse": f"file://{folder}/warehouse"}


@functools.lru_cache(maxsize=8)
def cached_catalog(name: str, properties: tuple):
    """One pyiceberg catalog (a SQL catalog holds a pool of database connections) per name and properties, per
    process."""
    from pyiceberg.catalog import load_catalog

    return load_catalog(name, **dict(properties))


@dataclass(frozen=True)
class IcebergTable:
    """An Apache Iceberg table `identifier` (NAMESPACE.TABLE) of the pyiceberg catalog `catalog`. Picklable:
    the catalog is loaded where it is used (the driver)."""

    catalog: str
    identifier: str
    location: str = ""  # the table's location, once known (where its data files are)
    embedded_folder: str = ""  # EMBEDDED_CATALOG's folder, as the run resolved it (readers run elsewhere)

    @property
    def name(self) -> str:
        return f"iceberg table {self.catalog}.{self.identifier}"

    def load_catalog(self):
        properties = catalog_properties(self.catalog, self.embedded_folder)
        return cached_catalog(self.catalog, tuple(sorted((key, str(value)) for key, value in properties.items())))

    def open(self):
        return self.load_catalog().load_table(self.identifier)

    def prepare(self, overwrite: bool, run_folder: str, settings_digest: Optional[str] = None,
                check_settings: bool = False) -> "IcebergTable":
        """Create the table (and its namespace), or check the existing one's schema (and with overwrite,
        delete its rows); the table with its location. The table is bound to one run folder (RUN_FOLDER_KEY):
        another folder's lease could not keep a second writer off it. It records the digest of its rows'
        settings (SETTINGS_KEY); with check_settings (the run folder has no settings to compare) a table made
        with others is refused, unless overwrite replaces its rows."""
        from pyiceberg.exceptions import NoSuchTableError
        from pyiceberg.expressions import AlwaysTrue

        catalog = self.load_catalog()
        ours = {RUN_FOLDER_KEY: run_folder, ICEBERG_RETRIES_KEY: "0", **({SETTINGS_KEY: settings_digest} if settings_digest else {})}
        try:
            table = catalog.load_table(self.identifier)
        except NoSuchTableError:
            catalog.create_namespace_if_not_exists(self.identifier.rsplit(".", 1)[0])
            table = catalog.create_table_if_not_exists(self.identifier, schema=RESULT_SCHEMA, properties=ours)
            log.info("created %s", self.name)
        problem = schema_problem(f"{self.catalog}.{self.identifier}", table.schema().as_arrow())
        if problem:
            raise ConfigError(problem)
        owner, made_with = table.properties.get(RUN_FOLDER_KEY), table.properties.get(SETTINGS_KEY)
        if owner is not None and owner != run_folder:
            raise ConfigError(f"output table {self.catalog}.{self.identifier} is written through the run folder {owner}, "
                              f"not output.path={run_folder}: one run folder per table keeps one writer at a time; "
                              f"set output.path={owner}")
        if check_settings and not overwrite and made_with and settings_digest and made_with != settings_digest:
            raise ConfigError(f"output table {self.catalog}.{self.identifier} holds results made with other settings than "
                              f"this run's (its {SETTINGS_KEY} differs), and output.path={run_folder} holds no settings "
                              f"to say which: run with the settings it was made with, or pass output.overwrite=true to "
                              f"replace its rows")
        if made_with and not overwrite:
            ours.pop(SETTINGS_KEY, None)  # the digest of the rows it holds; the run folder's settings check the run's
        if any(table.properties.get(key) != value for key, value in ours.items()):
            with table.transaction() as transaction:
                transaction.set_properties(ours)
        if overwrite and table.current_snapshot() is not None:
            table.delete(AlwaysTrue())
        return IcebergTable(self.catalog, self.identifier, table.location(), self.embedded_folder)

    def located(self) -> "IcebergTable":
        """The table with its location (where its data files are), as the catalog has it."""
        return IcebergTable(self.catalog, self.identifier, self.open().location(), self.embedded_folder)

    def manifest_entry(self) -> dict:
        """What the manifest records of the table, for readers (app.output.reader)."""
        return {"format": "iceberg", **asdict(self)}

    def version(self) -> Optional[int]:
        snapshot = self.open().current_snapshot()
        return snapshot.snapshot_id if snapshot else None

    def data_files(self) -> list[str]:
        tasks = list(self.open().scan().plan_files())
        if any(task.delete_files for task in tasks):
            raise ConfigError(f"output table {self.catalog}.{self.identifier} has delete files (rows another engine deleted "
                              f"merge-on-read): its data files no longer hold exactly its rows; compact it "
                              f"(rewrite_data_files) and rerun")
        return [path_on_filesystem(task.file.file_path) for task in tasks]

    def append(self, rows: pa.Table, expected: Optional[int], metadata: dict[str, str]) -> int:
        """Append rows in one snapshot on top of snapshot `expected`; the snapshot made. Raises TableMoved when
        the table's current snapshot is another, before the commit or when it is made."""
        from pyiceberg.exceptions import CommitFailedException

        table = self.at(expected)
        try:
            table.append(rows, snapshot_properties=metadata)
        except CommitFailedException as error:
            raise TableMoved(f"{self.name} moved on from snapshot {expected} while this run committed ({error})") from error
        made = table.current_snapshot()
        if made.parent_snapshot_id != expected:  # a table whose retries were set again after this run set them
            raise TableMoved(f"{self.name}: this run's commit (snapshot {made.snapshot_id}) landed on snapshot "
                             f"{made.parent_snapshot_id} of another writer, not on {expected}")
        return made.snapshot_id

    def at(self, expected: Optional[int]):
        """The table, read now; TableMoved when its current snapshot is not `expected`."""
        table = self.open()
        current = table.current_snapshot()
        if (current.snapshot_id if current else None) != expected:
            raise TableMoved(f"{self.name} is at snapshot {current.snapshot_id if current else None}, not this run's "
                             f"{expected}")
        return table

    def delete_rows(self, error_kinds: list[str], expected: Optional[int]) -> tuple[int, Optional[int]]:
        """Delete the rows with these error kinds (data.retry_errors) in one snapshot on top of `expected`: the
        number deleted and the snapshot made (`expected` when there were none)."""
        from pyiceberg.exceptions import CommitFailedException
        from pyiceberg.expressions import In

        table = self.at(expected)
        found = table.scan(row_filter=In("error_kind", error_kinds), selected_fields=("path",)).to_arrow().num_rows
        if not found:
            return 0, expected
        try:
            table.delete(In("error_kind", error_kinds))
        except CommitFailedException as error:
            raise TableMoved(f"{self.name} moved on from snapshot {expected} while this run committed ({error})") from error
        return found, table.current_snapshot().snapshot_id

    def control_uri(self) -> Optional[str]:
        return None  # output.path

    def files_root(self) -> str:
        return self.location


# The library each table output needs, and the extra that installs it (the image has both).
LIBRARIES = {OutputFormat.delta: ("deltalake", "delta"), OutputFormat.iceberg: ("pyiceberg", "iceberg")}


def table_of(section: OutputConfig) -> Optional[RowTable]:
    """The table output.format names (None for the Parquet dataset). A ConfigError when its library is missing."""
    if section.format == OutputFormat.parquet:
        return None
    module, extra = LIBRARIES[section.format]
    if importlib.util.find_spec(module) is None:
        raise ConfigError(f"output={section.format.value} needs {module}, which is not installed: pip install 'ray-detect[{extra}]'")
    if section.format == OutputFormat.delta:
        return DeltaTable(storage.absolute(section.path))
    catalog_properties(section.catalog, embedded := os.path.abspath(EMBEDDED_CATALOG_DIR))  # fails here, before the run
    return IcebergTable(section.catalog, section.table, embedded_folder=embedded if section.catalog == EMBEDDED_CATALOG else "")


def table_from_manifest(entry: dict) -> RowTable:
    """The table a manifest's "table" entry names (manifest_entry)."""
    fields = {key: value for key, value in entry.items() if key != "format"}
    return DeltaTable(**fields) if entry["format"] == "delta" else IcebergTable(**fields)


def rows_filesystem(table: RowTable) -> pafs.FileSystem:
    """The filesystem the table's data files are on."""
    return storage.resolve(table.files_root()).filesystem
