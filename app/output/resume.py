"""What output.path already holds, found by Ray tasks so that the driver never holds every path.

Committed rows are read file by file in tasks; each row's key (its path; a video frame's path and index,
app.result_schema.row_keys) becomes a 16-byte BLAKE2b digest, and the sorted digests of all of them are
one array in Ray's object store (16 bytes a row: 160 MB for 10 million rows), which the tasks that drop
already-done inputs search. Two different keys share a 16-byte digest with a chance of about 10^-22 at
10^8 keys. The driver keeps the keys that got their row in this run in a PathSet of such digests, so that
a path listed twice gets one row.
"""

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import ray

from app.output.dataset import committed_files, rows_filesystem
from app.result_schema import RESULT_SCHEMA, frame_key, row_keys
from app.storage import Location

DIGEST = np.dtype("S16")
# Committed files one task reads.
FILES_PER_SCAN_TASK = 32


def digests(paths: list[str]) -> np.ndarray:
    return np.array([hashlib.blake2b(path.encode(), digest_size=16).digest() for path in paths], dtype=DIGEST)


def contains(index: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Which of values are in the sorted index."""
    if not len(index):
        return np.zeros(len(values), dtype=bool)
    where = np.searchsorted(index, values).clip(max=len(index) - 1)
    return index[where] == values


def merge_sorted(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """The sorted digests of two sorted arrays, in one pass over the first."""
    return np.insert(first, np.searchsorted(first, second), second)


class PathSet:
    """A set of paths held as their digests, about 16 bytes a path (10^8 paths: 1.6 GB): sorted runs of
    distinct digests and a sorted buffer of the latest ones. The buffer becomes a run once it holds
    buffer_rows digests, and the last run is merged into the one before it while that one is at most twice
    its size: each run is then over twice the next, so there are at most log2(len / buffer_rows) + 1 runs
    to search. A merge holds both runs and their merge for a moment: up to twice the set's bytes."""

    def __init__(self, buffer_rows: int = 1 << 16):
        self.buffer_rows = buffer_rows
        self.runs: list[np.ndarray] = []
        self.buffer = np.empty(0, dtype=DIGEST)

    def __len__(self) -> int:
        return len(self.buffer) + sum(len(run) for run in self.runs)

    @property
    def nbytes(self) -> int:
        """The bytes its arrays hold."""
        return self.buffer.nbytes + sum(run.nbytes for run in self.runs)

    def __contains__(self, path: str) -> bool:
        return bool(self.contains([path])[0])

    def contains(self, paths: list[str]) -> np.ndarray:
        """Which of paths are in the set."""
        return self.contains_digests(digests(paths))

    def contains_digests(self, values: np.ndarray) -> np.ndarray:
        found = contains(self.buffer, values)
        for run in self.runs:
            found |= contains(run, values)
        return found

    def add_new(self, paths: list[str]) -> np.ndarray:
        """Add paths; True for each that was not in the set before, and of a path given several times, for
        its first occurrence only."""
        return self.add_new_digests(digests(paths))

    def add_new_digests(self, values: np.ndarray) -> np.ndarray:
        """add_new for paths given as their digests."""
        distinct, first = np.unique(values, return_index=True)
        fresh = ~self.contains_digests(distinct)
        new = np.zeros(len(values), dtype=bool)
        new[first[fresh]] = True
        self.buffer = merge_sorted(self.buffer, distinct[fresh])
        if len(self.buffer) >= self.buffer_rows:
            self.runs.append(self.buffer)
            self.buffer = np.empty(0, dtype=DIGEST)
            while len(self.runs) > 1 and len(self.runs[-2]) <= 2 * len(self.runs[-1]):
                last = self.runs.pop()
                self.runs[-1] = merge_sorted(self.runs[-1], last)
        return new


@dataclass
class OutputScan:
    """Counts of the committed rows."""

    rows: int = 0
    unique_keys: int = 0
    detections: int = 0
    errors_by_kind: Counter = field(default_factory=Counter)
    # The versions of the videos that have frame rows (app.video.video_version), by path.
    video_versions: dict[str, str] = field(default_factory=dict)


def scan_files(output: Location, files: list[str]) -> tuple[OutputScan, np.ndarray]:
    """Counts of the rows in files, and their keys' digests."""
    dataset = pads.dataset(files, schema=RESULT_SCHEMA, filesystem=rows_filesystem(output), format="parquet")
    scan, index = OutputScan(), [np.empty(0, dtype=DIGEST)]
    for batch in dataset.to_batches(columns=["path", "error_kind", "num_detections", "frame_index", "video_version"]):
        scan.rows += batch.num_rows
        scan.detections += int(pc.sum(batch.column("num_detections")).as_py() or 0)
        scan.errors_by_kind.update(batch.column("error_kind").drop_null().to_pylist())
        index.append(digests(row_keys(pa.Table.from_batches([batch]))))
        if batch.column("video_version").null_count < batch.num_rows:
            videos = pa.Table.from_batches([batch]).filter(pc.is_valid(batch.column("video_version")))
            scan.video_versions.update(zip(videos["path"].to_pylist(), videos["video_version"].to_pylist()))
    return scan, np.concatenate(index)


def merge_scans(*scans: tuple[OutputScan, np.ndarray]) -> tuple[OutputScan, np.ndarray]:
    """One scan of all: counts added up, digests sorted, distinct paths counted."""
    total = OutputScan()
    for scan, _ in scans:
        total.rows += scan.rows
        total.detections += scan.detections
        total.errors_by_kind += scan.errors_by_kind
        total.video_versions.update(scan.video_versions)
    index = np.sort(np.concatenate([np.empty(0, dtype=DIGEST)] + [index for _, index in scans]))
    total.unique_keys = int(len(index) and 1 + np.count_nonzero(index[1:] != index[:-1]))
    return total, index


_scan_task = ray.remote(num_cpus=1)(scan_files)
_merge_task = ray.remote(num_cpus=1, num_returns=2)(merge_scans)


def scan_output(output: Location, in_ray: bool):
    """Scan every committed file: in Ray tasks when in_ray (the digests then stay in the object store:
    the second value is a reference to them), else in this process (small outputs). One task's files
    (FILES_PER_SCAN_TASK) are scanned in this process either way: a task would wait for a CPU, which at the
    end of a run the detector actors may still hold for a second."""
    files = committed_files(output)
    chunks = [files[i : i + FILES_PER_SCAN_TASK] for i in range(0, len(files), FILES_PER_SCAN_TASK)]
    if not in_ray or len(chunks) <= 1:
        scan, index = merge_scans(*(scan_files(output, chunk) for chunk in chunks))
        return scan, ray.put(index) if in_ray else index
    scan, index = _merge_task.remote(*[_scan_task.remote(output, chunk) for chunk in chunks])
    ray.wait([index], fetch_local=False)  # built before the pipeline's tasks and actors take the CPUs
    return ray.get(scan), index


@ray.remote(num_cpus=0)
class InputTally:
    """The inputs the streamed listing produced, each distinct path once, and which of them each block
    brings first. A block's answer is kept under the digest of its paths: a retried task gets the same
    answer and counts nothing twice. A path listed again in another block (a manifest naming it twice) is
    not brought there; two blocks of the same paths in the same order get one answer, and the driver
    drops the second block's rows as it commits (app.output.verdicts). About 16 bytes a path."""

    def __init__(self):
        self.paths = PathSet()
        self.blocks: dict[bytes, np.ndarray] = {}  # a block's key: its rows' "brought first" flags, packed
        self.rows = 0

    def record(self, values: np.ndarray) -> np.ndarray:
        """Which rows of a block (their paths' digests) bring their path first."""
        key = hashlib.blake2b(values.tobytes(), digest_size=16).digest()
        if key not in self.blocks:
            self.blocks[key] = np.packbits(self.paths.add_new_digests(values))
            self.rows += len(values)
        return np.unpackbits(self.blocks[key], count=len(values)).astype(bool)

    def total(self) -> int:
        return len(self.paths)

    def duplicates(self) -> int:
        """Rows of paths listed before."""
        return self.rows - len(self.paths)


def drop_done(batch: pa.Table, *, index: Optional[ray.ObjectRef], uri_prefix: str, tally) -> pa.Table:
    """Ray Data UDF: input rows in, those that bring their key first and have no committed row out;
    every key in is counted by the tally. A video's segment (app.video.SEGMENT_SCHEMA) has a key per
    frame: it comes out with its frames that pass, or not at all when none does."""
    if not batch.num_rows:
        return batch
    if "frame_indexes" not in batch.column_names:
        values = digests([uri_prefix + path for path in batch.column("path").to_pylist()])
        return batch.filter(pa.array(kept(values, index, tally)))
    rows = batch.to_pylist()
    keys = [[frame_key(uri_prefix + row["path"], frame) for frame in row["frame_indexes"] or [None]] for row in rows]
    keep = iter(kept(digests([key for frames in keys for key in frames]), index, tally).tolist())
    out = []
    for row, frames in zip(rows, keys):
        mask = [next(keep) for _ in frames]
        if not any(mask):
            continue
        if row["frame_indexes"] is not None and not all(mask):
            for name in ("frame_indexes", "frame_pts", "frame_times"):
                if row[name] is not None:
                    row[name] = [value for value, keep_it in zip(row[name], mask) if keep_it]
        out.append(row)
    return pa.Table.from_pylist(out, schema=batch.schema)


def kept(values: np.ndarray, index: Optional[ray.ObjectRef], tally) -> np.ndarray:
    """Which of these key digests the tally finds first, and are not in the committed `index`."""
    keep = ray.get(tally.record.remote(values))
    if index is not None:
        keep = keep & ~contains(ray.get(index), values)
    return keep
