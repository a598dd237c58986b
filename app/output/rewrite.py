"""Rewriting committed files without some of their rows: the rows a key (app.result_schema.row_keys) holds beyond its one
(repair_duplicates), and error rows whose images are to be read again (remove_rows_of_kinds).

A file is rewritten by committing the rows it keeps as a new file through the run's ResultWriter (staged,
lease checked, moved into place) and then deleting it, one file at a time. A crash in between leaves that
file's kept rows twice, never none; the next repair_duplicates removes the second copy. Which rows go is
decided from the key and error_kind columns alone, read in Ray tasks when Ray is initialised (as
resume.scan_output does), else in this process; a file without such rows is left as it is. The driver
holds 33 bytes for each row of a path that has several, and a number for each file holding rows to remove.

Call both before the writer commits rows of its own: they rewrite every file committed_files lists.
"""

from typing import Callable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import ray

from app.output import resume
from app.output.dataset import committed_files
from app.output.resume import DIGEST, FILES_PER_SCAN_TASK, contains, digests
from app.output.writer import ResultWriter
from app.result_schema import RESULT_SCHEMA, row_keys
from app.storage import Location

# A row of a path that has several: its digest, the number of its file in committed_files order, its
# place in the file, and whether it is an error row.
CANDIDATE = np.dtype([("digest", DIGEST), ("file", np.int64), ("row", np.int64), ("error", bool)])


def read_file(output: Location, path: str, columns: Optional[list[str]] = None) -> pa.Table:
    """A committed file's rows in their order, as RESULT_SCHEMA has them (a column the file predates is null)."""
    return pads.dataset([path], schema=RESULT_SCHEMA, filesystem=output.filesystem, format="parquet").to_table(columns=columns)


def repeated_digests(index: np.ndarray) -> np.ndarray:
    """The digests that a sorted index holds more than once, sorted, each once."""
    return np.unique(index[1:][index[1:] == index[:-1]])


def rows_of_digests(output: Location, files: list[str], first: int, wanted: np.ndarray) -> np.ndarray:
    """The rows of files (numbered from `first`) whose key's digest is in the sorted `wanted`, as CANDIDATEs."""
    found = [np.empty(0, dtype=CANDIDATE)]
    for number, path in enumerate(files, first):
        rows = read_file(output, path, ["path", "frame_index", "error_kind"])
        values = digests(row_keys(rows))
        at = np.flatnonzero(contains(wanted, values))
        part = np.empty(len(at), dtype=CANDIDATE)
        part["digest"], part["file"], part["row"] = values[at], number, at
        part["error"] = pc.is_valid(rows.column("error_kind")).to_numpy()[at]
        found.append(part)
    return np.concatenate(found)


def counts_of_kinds(output: Location, files: list[str], first: int, kinds: list[str]) -> list[tuple[int, int]]:
    """(number, rows) of each of files (numbered from `first`) holding rows whose error_kind is in kinds."""
    counts = []
    for number, path in enumerate(files, first):
        found = pc.sum(pc.is_in(read_file(output, path, ["error_kind"]).column("error_kind"), pa.array(kinds))).as_py()
        if found:
            counts.append((number, found))
    return counts


_repeated_task = ray.remote(num_cpus=1)(repeated_digests)
_rows_of_digests_task = ray.remote(num_cpus=1)(rows_of_digests)
_counts_of_kinds_task = ray.remote(num_cpus=1)(counts_of_kinds)


def in_chunks(output: Location, files: list[str], scan: Callable, task, argument, in_ray: bool) -> list:
    """scan(output, chunk, number of its first file, argument) for each chunk of FILES_PER_SCAN_TASK files:
    by `task` (scan as a Ray task) when in_ray, else here."""
    starts = range(0, len(files), FILES_PER_SCAN_TASK)
    if in_ray:
        return ray.get([task.remote(output, files[i : i + FILES_PER_SCAN_TASK], i, argument) for i in starts])
    return [scan(output, files[i : i + FILES_PER_SCAN_TASK], i, argument) for i in starts]


def rows_beyond_one(candidates: np.ndarray) -> dict[int, np.ndarray]:
    """Of the rows of repeated paths, those to drop, by file number: all but one per path, the first row
    without error in committed order, or the first row when all are errors."""
    ordered = candidates[np.lexsort((candidates["row"], candidates["file"], candidates["error"], candidates["digest"]))]
    drop = ordered[np.r_[False, ordered["digest"][1:] == ordered["digest"][:-1]]]
    return {int(number): np.sort(drop["row"][drop["file"] == number]) for number in np.unique(drop["file"])}


def rewrite_file(output: Location, writer: ResultWriter, path: str, dropped: Callable[[pa.Table], np.ndarray]) -> int:
    """Commit the rows of the file at path, less those the mask dropped(rows) marks, as a new file (none
    when no row is left), then delete the file; the number of rows dropped."""
    rows = read_file(output, path)
    drop = dropped(rows)
    kept = rows.filter(pa.array(~drop))
    if kept.num_rows:
        writer.write_file(kept)
    writer.before_commit()  # the file is deleted only while the lease holds
    output.filesystem.delete_file(path)
    return int(drop.sum())


def repair_duplicates(output: Location, writer: ResultWriter, in_ray: Optional[bool] = None) -> int:
    """Leave one row per key in output, whose files may hold several (from older versions, or a crash
    in a rewrite): the first row without error in committed_files order, else the first row. Each file
    holding a row to drop is rewritten through writer. Scans in Ray tasks when in_ray (by default when
    Ray is initialised). Returns the number of rows removed."""
    in_ray = ray.is_initialized() if in_ray is None else in_ray
    scan, index = resume.scan_output(output, in_ray)
    if scan.rows == scan.unique_keys:
        return 0
    repeated = _repeated_task.remote(index) if in_ray else repeated_digests(index)
    files = committed_files(output)
    candidates = np.concatenate(in_chunks(output, files, rows_of_digests, _rows_of_digests_task, repeated, in_ray))
    removed = 0
    for number, rows in sorted(rows_beyond_one(candidates).items()):
        removed += rewrite_file(output, writer, files[number], lambda table, rows=rows: np.isin(np.arange(table.num_rows), rows))
    return removed


def remove_rows_of_kinds(output: Location, writer: ResultWriter, kinds: list[str], in_ray: Optional[bool] = None) -> int:
    """Remove the rows whose error_kind is one of kinds, so that a run processes their paths again: each
    file holding some is rewritten through writer without them. Scans in Ray tasks when in_ray (by
    default when Ray is initialised). Returns the number of rows removed."""
    if not kinds:
        return 0
    in_ray = ray.is_initialized() if in_ray is None else in_ray
    files = committed_files(output)
    chunks = in_chunks(output, files, counts_of_kinds, _counts_of_kinds_task, kinds, in_ray)

    def of_kinds(table: pa.Table) -> np.ndarray:
        return pc.fill_null(pc.is_in(table.column("error_kind"), pa.array(kinds)), False).to_numpy()

    return sum(rewrite_file(output, writer, files[number], of_kinds) for chunk in chunks for number, _ in chunk)
