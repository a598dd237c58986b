"""The benchmark's sinks suite (`ray-detect bench sinks`): what a committed row costs in each output, the
Parquet dataset against a Delta table and an Iceberg table (pyiceberg's SQL catalog on SQLite), on local
disk. The same rows (--sink-rows of them, 5 detections each, the app's result schema) go through the writer
the app uses for each output (app.output.writer: Parquet files, or one table commit per file), in files of
--sink-rows-per-file rows, in the batches of 64 rows a detector call commits; then the output is scanned as a
resume scans it (its `path`, `error_kind` and `num_detections` columns). The outputs take turns, --repeats
times, on one machine in one run.
"""

import os
import shutil
import time
from pathlib import Path

import pyarrow as pa

from app.bench.harness import number, spread
from app.config import compose_config
from app.output import dataset, resume
from app.output.writer import writer_for
from app.result_schema import RESULT_SCHEMA

SINKS = ("parquet", "delta", "iceberg")
DETECTIONS = 5
CALL_ROWS = 64  # rows a detector call gives the writer at once
CATALOG = "bench"


def result_rows(count: int) -> pa.Table:
    """count rows as a run commits them: a path each, 640 x 480 images with DETECTIONS detections."""
    labels = [1, 3, 17, 18, 62][:DETECTIONS]
    return pa.Table.from_pydict({
        "path": [f"s3://bucket/images/{i:09d}.jpg" for i in range(count)],
        "width": [640] * count,
        "height": [480] * count,
        "boxes": [[[10.0 * k, 20.0 * k, 10.0 * k + 50, 20.0 * k + 60] for k in range(DETECTIONS)]] * count,
        "scores": [[0.9 - 0.1 * k for k in range(DETECTIONS)]] * count,
        "labels": [labels] * count,
        "label_names": [["person", "car", "cat", "dog", "chair"][:DETECTIONS]] * count,
        "num_detections": [DETECTIONS] * count,
        "num_tiles": [1] * count,
        "error_kind": pa.nulls(count, pa.string()),
        "error": pa.nulls(count, pa.string()),
        "frame_index": pa.nulls(count, pa.int64()),
        "frame_time_s": pa.nulls(count, pa.float64()),
        "video_version": pa.nulls(count, pa.string()),
    }, schema=RESULT_SCHEMA)


def output_overrides(sink: str, folder: Path) -> list[str]:
    if sink == "iceberg":
        return ["output=iceberg", f"output.catalog={CATALOG}", f"output.table=bench.t{folder.name}", f"output.path={folder / 'run'}"]
    return [f"output={sink}", f"output.path={folder / 'out'}"]


def commit_and_scan(sink: str, rows: pa.Table, rows_per_file: int, folder: Path) -> dict:
    """Seconds to commit rows through the sink's writer, and to scan them back as a resume does."""
    cfg = compose_config(["data.path=.", *output_overrides(sink, folder)])
    output = dataset.prepare_table(cfg.output, dataset.locate(cfg.output))  # as a run does, after its lease
    writer = writer_for(output, 1, "bench", rows_per_file, 3600.0, lambda: None)
    started = time.perf_counter()
    for start in range(0, rows.num_rows, CALL_ROWS):
        writer.add(rows.slice(start, CALL_ROWS))
    writer.close()
    committed = time.perf_counter() - started
    started = time.perf_counter()
    scan, _ = resume.scan_output(output, in_ray=False)
    scanned = time.perf_counter() - started
    assert scan.rows == scan.unique_keys == rows.num_rows, (sink, scan)
    return {"commit_s": committed, "scan_s": scanned, "commits": writer.sequence}


def run(args, base: Path) -> dict:
    count, per_file = args.sink_rows, args.sink_rows_per_file
    rows = result_rows(count)
    folder = base / "sinks"
    shutil.rmtree(folder, ignore_errors=True)  # a --workdir of an earlier run: its tables and catalog go
    os.environ[f"PYICEBERG_CATALOG__{CATALOG.upper()}__TYPE"] = "sql"
    os.environ[f"PYICEBERG_CATALOG__{CATALOG.upper()}__URI"] = f"sqlite:///{folder}/catalog.db"
    os.environ[f"PYICEBERG_CATALOG__{CATALOG.upper()}__WAREHOUSE"] = f"file://{folder}/warehouse"
    folder.mkdir(parents=True, exist_ok=True)
    timings: dict[str, list[dict]] = {sink: [] for sink in SINKS}
    for repeat in range(args.repeats):
        for sink in SINKS:  # in turns, so that a slow spell of the machine does not land on one output only
            place = folder / f"{sink}{repeat}"
            timings[sink].append(commit_and_scan(sink, rows, per_file, place))
            shutil.rmtree(place, ignore_errors=True)
    per_row = {sink: spread([1e6 * run["commit_s"] / count for run in runs], 2) for sink, runs in timings.items()}
    scan_per_row = {sink: spread([1e6 * run["scan_s"] / count for run in runs], 3) for sink, runs in timings.items()}
    return {
        "rows": count,
        "rows_per_file": per_file,
        "commits": {sink: runs[0]["commits"] for sink, runs in timings.items()},
        "commit_us_per_row": per_row,
        "scan_us_per_row": scan_per_row,
        "commit_over_parquet": {sink: round(per_row[sink]["median"] / per_row["parquet"]["median"], 2) for sink in SINKS},
        "runs": timings,
    }


def lines(sinks: dict) -> list[str]:
    report = [f"outputs, {sinks['rows']} rows of 5 detections in commits of {sinks['rows_per_file']} rows, median of repeats:"]
    for sink in SINKS:
        commit, scan = sinks["commit_us_per_row"][sink], sinks["scan_us_per_row"][sink]
        report.append(f"  {sink:8} commit {number(commit['median'], 7, 2)} us/row ({sinks['commit_over_parquet'][sink]:.2f}x parquet), "
                      f"{sinks['commits'][sink]} commits; resume scan {number(scan['median'], 6, 3)} us/row")
    return report
