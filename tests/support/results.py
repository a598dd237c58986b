"""Results directories as `python -m app` leaves them, written directly (Parquet, manifest, settings),
for the readers' tests (report, export, evaluate) to run without Ray."""

import json

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from app.output.dataset import MANIFEST_NAME
from app.result_schema import RESULT_SCHEMA

MODEL = "fasterrcnn_mobilenet_v3_large_320_fpn"


def ok_row(path, detections=(), width=200, height=150):
    """A results row; detections are (label id, name, score, [x1, y1, x2, y2])."""
    return {
        "path": str(path), "width": width, "height": height,
        "boxes": [list(box) for *_, box in detections],
        "scores": [score for _, _, score, _ in detections],
        "labels": [label for label, *_ in detections],
        "label_names": [name for _, name, *_ in detections],
        "num_detections": len(detections), "error_kind": None, "error": None,
    }


def error_row(path, kind, message):
    return {
        "path": str(path), "width": None, "height": None, "boxes": [], "scores": [], "labels": [],
        "label_names": [], "num_detections": 0, "error_kind": kind, "error": message,
    }


def write_results(folder, rows, weights="none", class_names=None, filesystem=None, settings=None, manifest_extra=None):
    """A results directory as `python -m app` leaves it: Parquet data files, the manifest (with manifest_extra's
    keys) and the settings."""
    filesystem = filesystem or pafs.LocalFileSystem()
    folder = str(folder)
    filesystem.create_dir(folder, recursive=True)
    table = pa.Table.from_pylist(rows, schema=RESULT_SCHEMA)
    half = len(rows) // 2  # two data files, as a run with several blocks writes
    for index, part in enumerate([table.slice(0, half), table.slice(half)]):
        pq.write_table(part, f"{folder}/part-test-{index}.parquet", filesystem=filesystem)
    manifest = {
        "complete": True,
        "config": {"model": {"name": MODEL, "weights": weights, "class_names": class_names, "num_classes": None}},
        "model": {"name": MODEL, "weights": weights, "random_init_fallback": None},
        "counts": {"inputs": len(rows)},
        **(manifest_extra or {}),
    }
    with filesystem.open_output_stream(f"{folder}/{MANIFEST_NAME}") as stream:
        stream.write(json.dumps(manifest).encode())
    # What else a run leaves there, which readers must skip: its settings and a crashed run's staging.
    with filesystem.open_output_stream(f"{folder}/_settings.json") as stream:
        stream.write(json.dumps(settings or {}).encode())
    filesystem.create_dir(f"{folder}/_staging/old", recursive=True)
    pq.write_table(table.slice(0, 1), f"{folder}/_staging/old/part-old-000000.parquet", filesystem=filesystem)
    return folder
