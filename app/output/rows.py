"""Result rows from the detector's output: one row per decoded image, with its detections or its error."""

import numpy as np
import pyarrow as pa

from app.result_schema import RESULT_SCHEMA
from app.tiling import Detections


def result_rows(batch: pa.Table, rows: np.ndarray, found: list[Detections], label_names: pa.Array,
                num_tiles: np.ndarray) -> pa.Table:
    """RESULT_SCHEMA rows for a decoded batch (app.decode.DECODED_SCHEMA): the detections `found` in the
    images of `rows` (boxes in the images' pixels, scores, label ids; the other rows are error rows), their
    labels named from `label_names`, and the model inputs each row took (`num_tiles`, by batch position)."""
    counts = np.zeros(batch.num_rows, np.int32)
    counts[rows] = [len(detections.labels) for detections in found]
    offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32))
    boxes = np.concatenate([d.boxes for d in found]).astype(np.float32) if found else np.zeros((0, 4), np.float32)
    scores = np.concatenate([d.scores for d in found]).astype(np.float32) if found else np.zeros(0, np.float32)
    labels = np.concatenate([d.labels for d in found]).astype(np.int64) if found else np.zeros(0, np.int64)
    coordinates = pa.ListArray.from_arrays(pa.array(np.arange(0, 4 * len(boxes) + 1, 4, dtype=np.int32)), pa.array(boxes.reshape(-1)))
    columns = {
        "path": batch.column("path"),
        "width": batch.column("width"),
        "height": batch.column("height"),
        "boxes": pa.ListArray.from_arrays(offsets, coordinates),
        "scores": pa.ListArray.from_arrays(offsets, pa.array(scores)),
        "labels": pa.ListArray.from_arrays(offsets, pa.array(labels)),
        "label_names": pa.ListArray.from_arrays(offsets, label_names.take(pa.array(labels))),
        "num_detections": pa.array(counts),
        "num_tiles": pa.array(num_tiles.astype(np.int32)),
        "error_kind": batch.column("error_kind"),
        "error": batch.column("error"),
        "frame_index": batch.column("frame_index"),
        "frame_time_s": batch.column("frame_time_s"),
        "video_version": batch.column("video_version"),
    }
    return pa.table(columns, schema=RESULT_SCHEMA)
