"""What output.path already holds, found by Ray tasks so that the driver never holds every path.

Committed rows are read file by file in tasks; each path becomes a 16-byte BLAKE2b digest, and the sorted
digests of all of them are one array in Ray's object store (16 bytes a row: 160 MB for 10 million rows),
which the tasks that drop already-done inputs search. Two different paths share a 16-byte digest with a
chance of about 10^-22 at 10^8 paths.
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

from app.output.dataset import RESULT_SCHEMA, committed_files
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


@dataclass
class OutputScan:
    """Counts of the committed rows."""

    rows: int = 0
    unique_paths: int = 0
    detections: int = 0
    errors_by_kind: Counter = field(default_factory=Counter)


def scan_files(output: Location, files: list[str]) -> tuple[OutputScan, np.ndarray]:
    """Counts of the rows in files, and their paths' digests."""
    dataset = pads.dataset(files, schema=RESULT_SCHEMA, filesystem=output.filesystem, format="parquet")
    scan, index = OutputScan(), [np.empty(0, dtype=DIGEST)]
    for batch in dataset.to_batches(columns=["path", "error_kind", "num_detections"]):
        scan.rows += batch.num_rows
        scan.detections += int(pc.sum(batch.column("num_detections")).as_py() or 0)
        scan.errors_by_kind.update(batch.column("error_kind").drop_null().to_pylist())
        index.append(digests(batch.column("path").to_pylist()))
    return scan, np.concatenate(index)


def merge_scans(*scans: tuple[OutputScan, np.ndarray]) -> tuple[OutputScan, np.ndarray]:
    """One scan of all: counts added up, digests sorted, distinct paths counted."""
    total = OutputScan()
    for scan, _ in scans:
        total.rows += scan.rows
        total.detections += scan.detections
        total.errors_by_kind += scan.errors_by_kind
    index = np.sort(np.concatenate([np.empty(0, dtype=DIGEST)] + [index for _, index in scans]))
    total.unique_paths = int(len(index) and 1 + np.count_nonzero(index[1:] != index[:-1]))
    return total, index


_scan_task = ray.remote(num_cpus=1)(scan_files)
_merge_task = ray.remote(num_cpus=1, num_returns=2)(merge_scans)


def scan_output(output: Location, in_ray: bool):
    """Scan every committed file: in Ray tasks when in_ray (the digests then stay in the object store:
    the second value is a reference to them), else in this process (small outputs)."""
    files = committed_files(output)
    chunks = [files[i : i + FILES_PER_SCAN_TASK] for i in range(0, len(files), FILES_PER_SCAN_TASK)]
    if not in_ray:
        return merge_scans(*(scan_files(output, chunk) for chunk in chunks))
    scan, index = _merge_task.remote(*[_scan_task.remote(output, chunk) for chunk in chunks])
    ray.wait([index], fetch_local=False)  # built before the pipeline's tasks and actors take the CPUs
    return ray.get(scan), index


@ray.remote(num_cpus=0)
class InputTally:
    """How many inputs the streamed listing produced, by block: a retried task records its block again
    under the same key, so nothing is counted twice."""

    def __init__(self):
        self.blocks: dict[tuple[str, int], int] = {}

    def record(self, key: tuple[str, int], rows: int) -> None:
        self.blocks[key] = rows

    def total(self) -> int:
        return sum(self.blocks.values())


def drop_done(batch: pa.Table, *, index: Optional[ray.ObjectRef], uri_prefix: str, tally) -> pa.Table:
    """Ray Data UDF: input rows in, those without a committed row out; every row in is counted."""
    if batch.num_rows:
        ray.get(tally.record.remote((batch.column("path")[0].as_py(), batch.num_rows), batch.num_rows))
    if index is None or not batch.num_rows:
        return batch
    done = contains(ray.get(index), digests([uri_prefix + path for path in batch.column("path").to_pylist()]))
    return batch.filter(pa.array(~done))
