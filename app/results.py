"""The output: one Parquet row per input image, committed file by file, and the run manifest.

Layout of output.path (the commit protocol):
  part-<run>-<seq>.parquet  committed rows. Each file is written whole under _staging/ and then moved
                            here in one step, so readers never see a half-written file.
  _settings.json            what the rows depend on, written when the first run starts. A later run on
                            the same output.path resumes only with the same settings.
  _staging/                 files being written; anything left there by a crashed run is discarded.
  _manifest.json            written last, when every input has its row: a directory without it is an
                            incomplete run.
  _lease.json               the lease of the run writing here now, if any (app/lease.py).
Names starting with "_" are ignored by pyarrow, pandas, DuckDB and Spark readers of the dataset.
"""

import json
import time
from typing import Optional

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from app.storage import Location

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
        ("error_kind", pa.string()),  # null on success; see app/decode.py for the kinds
        ("error", pa.string()),
    ]
)

MANIFEST_NAME = "_manifest.json"
SETTINGS_NAME = "_settings.json"
STAGING_DIR = "_staging"
PART_PREFIX = "part-"


def json_bytes(document: dict) -> bytes:
    return json.dumps(document, indent=2, sort_keys=True).encode() + b"\n"


def write_json(filesystem: pafs.FileSystem, path: str, document: dict) -> None:
    with filesystem.open_output_stream(path) as stream:
        stream.write(json_bytes(document))


def read_json(filesystem: pafs.FileSystem, path: str) -> Optional[dict]:
    """The JSON document at path, or None when there is none."""
    if filesystem.get_file_info(path).type != pafs.FileType.File:
        return None
    with filesystem.open_input_stream(path) as stream:
        return json.loads(stream.read())


def committed_files(output: Location) -> list[str]:
    entries = output.filesystem.get_file_info(pafs.FileSelector(output.path, allow_not_found=True))
    return sorted(
        entry.path
        for entry in entries
        if entry.type == pafs.FileType.File
        and entry.base_name.startswith(PART_PREFIX)
        and entry.base_name.endswith(".parquet")
    )


def read_committed(output: Location, columns: list[str]) -> pa.Table:
    """The given columns of every committed row."""
    files = committed_files(output)
    if not files:
        return RESULT_SCHEMA.empty_table().select(columns)
    dataset = pads.dataset(files, schema=RESULT_SCHEMA, filesystem=output.filesystem, format="parquet")
    return dataset.to_table(columns=columns)


class ResultWriter:
    """Commits result rows as Parquet files of up to rows_per_file rows, and at least every
    commit_interval_s seconds, so a crash loses only rows not yet committed."""

    def __init__(self, output: Location, run_id: str, rows_per_file: int, commit_interval_s: float):
        self.output, self.run_id = output, run_id
        self.rows_per_file, self.commit_interval_s = rows_per_file, commit_interval_s
        self.pending: list[pa.Table] = []
        self.pending_rows = 0
        self.sequence = 0
        self.last_commit = time.monotonic()
        output.filesystem.create_dir(output.join(STAGING_DIR, run_id), recursive=True)

    def add(self, rows: pa.Table) -> None:
        self.pending.append(rows)
        self.pending_rows += rows.num_rows
        if self.pending_rows >= self.rows_per_file:
            table = pa.concat_tables(self.pending)
            full = table.num_rows - table.num_rows % self.rows_per_file
            for start in range(0, full, self.rows_per_file):
                self.write_file(table.slice(start, self.rows_per_file))
            self.pending, self.pending_rows = [table.slice(full)], table.num_rows - full
        if time.monotonic() - self.last_commit >= self.commit_interval_s:
            self.commit()

    def commit(self) -> None:
        """Commit the pending rows now."""
        if self.pending_rows:
            self.write_file(pa.concat_tables(self.pending))
        self.pending, self.pending_rows = [], 0

    def write_file(self, rows: pa.Table) -> None:
        """Write rows under _staging/, then move the whole file into the dataset in one step."""
        name = f"{PART_PREFIX}{self.run_id}-{self.sequence:06d}.parquet"
        staged = self.output.join(STAGING_DIR, self.run_id, name)
        pq.write_table(rows.cast(RESULT_SCHEMA), staged, filesystem=self.output.filesystem)
        self.output.filesystem.move(staged, self.output.join(name))
        self.sequence += 1
        self.last_commit = time.monotonic()

    def close(self) -> None:
        self.commit()
        self.output.filesystem.delete_dir(self.output.join(STAGING_DIR))
