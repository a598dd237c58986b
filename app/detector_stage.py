"""The detector stage: Ray Data's class UDF, built once in each actor of the pool. It reads the pixels of
each decoded batch (app.decode.pixels), hands them to the detector (app.detector, which returns boxes,
scores and labels per image), moves the boxes into each image's pixels, merges the detections of a tiled
image's tiles (app.tiling), and makes the result rows (app.output.rows) with the measurements of
app.metrics beside them.

Nothing here imports torch: the driver imports this module to map the stage, and the detector (torch and
torchvision) is imported in the actors, so that the driver of a run with a checkpoint or random weights
starts about 3 s sooner and stays about 600 MB smaller (app.model says when it does load them).
"""

import os
from typing import TYPE_CHECKING, NamedTuple, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from app import decode
from app.metrics import (
    BATCH_IMAGES_COLUMN,
    BATCH_PADDING_COLUMN,
    BATCH_SIZE_COLUMN,
    DECODE_SECONDS_COLUMN,
    DEVICE_BUSY_COLUMN,
    INPUT_BYTES_COLUMN,
    MODEL_SECONDS_COLUMN,
    WORKER_COLUMN,
    ActorAlive,
)
from app.output.rows import result_rows
from app.tiling import Detections, TilingOptions, merge_detections

if TYPE_CHECKING:
    from app.detector import ModelBatch
    from app.model import ModelSpec


class DetectorStage:
    """Ray Data's class UDF of the detector stage. Each actor builds `detector` (app.detector.Detector, or
    a subclass such as the benchmark's stand-in) from `spec`, `tiling` and `options` (the detector's other
    arguments), and with `metric_tags` (the run's, app.metrics) reports itself alive in the run's metrics.
    tiling (tiling=tiles) has it detect the tiles of the images the decode task tiled and merge their
    detections."""

    def __init__(self, spec: "ModelSpec", tiling: Optional[TilingOptions] = None,
                 metric_tags: Optional[dict[str, str]] = None, detector: Optional[type] = None, **options):
        if detector is None:
            from app.detector import Detector as detector
        self.detector = detector(spec, tiling=tiling, **options)
        self.tiling = tiling
        self.label_names = pa.array(self.detector.categories, pa.string())
        self.worker = worker_name(self.detector.device_name)
        if metric_tags:
            ActorAlive(metric_tags, self.detector.device_name)

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Ray Data's call: decoded rows (app.decode.DECODED_SCHEMA) in, result rows out, one for one,
        with the measurements of app.metrics beside them."""
        rows = np.flatnonzero(pc.is_null(batch.column("error_kind")).to_numpy(zero_copy_only=False))
        views = model_views(batch, rows, self.tiling)
        found, ran = self.detector.detect_batches([view.pixels for view in views])
        detections = image_detections(views, found, self.tiling)
        num_tiles = np.bincount([view.row for view in views], minlength=batch.num_rows)
        table = result_rows(batch, rows, [detections[i] for i in rows], self.label_names, num_tiles)
        columns = measurements(batch, rows, views, ran, self.worker, self.detector.batch_size, self.detector.device_busy)
        for name, column in columns.items():
            table = table.append_column(name, column)
        return table


def worker_name(device: str) -> str:
    """This actor's node, its id and its device, as WORKER_COLUMN holds them (outside Ray: this process)."""
    if not ray.is_initialized():
        return f"local/{os.getpid()}/{device}"
    context = ray.get_runtime_context()
    return f"{context.get_node_id()}/{context.get_actor_id()}/{device}"


class View(NamedTuple):
    """One model input of a decoded row: its image at model size, or a tile of its full-size pixels, or
    the whole image of a tiled row. Its boxes go into the image's pixels times `scale`, plus `offset`."""

    row: int  # the row's position in its batch
    pixels: np.ndarray
    scale: tuple[float, float]  # the image's pixels per pixel of the view, across and down
    offset: tuple[int, int]  # the view's top-left corner in the image's pixels


def model_views(batch: pa.Table, rows: np.ndarray, tiling: Optional[TilingOptions]) -> list[View]:
    """The model inputs of a decoded batch's `rows` (those without an error), row by row. An untiled
    image is one view. A tiled one is its tiles, cropped from its full-size pixels without a copy, then,
    with tiling.full_image, the whole image: at model size, or at full size for the model to resize on
    the device when inference.resize_on_cpu is off."""
    valid = {name: batch.column(name).is_valid().to_numpy(zero_copy_only=False) for name in ("pixels", "scene")}
    with_pixels, with_scene = rows[valid["pixels"][rows]], rows[valid["scene"][rows]]
    images = dict(zip(with_pixels.tolist(), decode.pixels(batch, with_pixels)))
    scenes = dict(zip(with_scene.tolist(), decode.pixels(batch, with_scene, "scene")))
    tiles = batch.column("tiles")
    widths, heights = (batch.column(name).to_numpy(zero_copy_only=False) for name in ("width", "height"))

    def whole(i: int, image: np.ndarray) -> View:
        return View(i, image, (widths[i] / image.shape[1], heights[i] / image.shape[0]), (0, 0))

    views = []
    for i in rows.tolist():
        if i not in scenes:
            views.append(whole(i, images[i]))
            continue
        scene = scenes[i]
        for x1, y1, x2, y2 in np.array(tiles[i].as_py(), np.int64).reshape(-1, 4).tolist():
            views.append(View(i, scene[y1:y2, x1:x2], (1.0, 1.0), (x1, y1)))
        if tiling.full_image:
            views.append(whole(i, images.get(i, scene)))
    return views


def image_detections(views: list[View], found: list[dict[str, np.ndarray]], tiling: Optional[TilingOptions]) -> dict[int, Detections]:
    """The detections of each row's image in its pixels, by row: its views' boxes scaled (in float32, as
    torchvision scales them) and moved into the image, merged (app.tiling) when the image was tiled."""
    by_row: dict[int, list[Detections]] = {}
    for view, detections in zip(views, found):
        boxes = detections["boxes"]
        if view.scale != (1.0, 1.0):
            boxes = boxes * np.array(view.scale * 2, np.float32)
        boxes = boxes.astype(np.float64) + np.array(view.offset * 2, np.float64)
        by_row.setdefault(view.row, []).append(Detections(boxes, detections["scores"], detections["labels"]))
    merged = {}
    for row, parts in by_row.items():
        joined = Detections(*(np.concatenate(column) for column in zip(*parts)))
        merged[row] = merge_detections(joined, tiling) if tiling is not None and len(parts) > 1 else joined
    return merged


def measurements(batch: pa.Table, rows: np.ndarray, views: list[View], ran: list["ModelBatch"],
                 worker: str, batch_size: int, device_busy: Optional[float]) -> dict[str, pa.Array]:
    """The measurement columns (app.metrics) of a batch's result rows: the actor that made them, the
    decode task's bytes and seconds, the share of the model's seconds of each row of `rows` (those
    detected), the images and padding of the model batches that began with one of its views (`ran`,
    whose indices are positions in `views`), the actor's batch size, and on the first row the share of the
    call's time its device was busy."""
    view_rows = np.array([view.row for view in views], np.int64)
    model_seconds = np.full(batch.num_rows, np.nan)
    model_seconds[rows] = 0.0
    batch_images: list[list[int]] = [[] for _ in range(batch.num_rows)]
    padding: list[list[float]] = [[] for _ in range(batch.num_rows)]
    for model_batch in ran:
        positions = view_rows[model_batch.indices]
        np.add.at(model_seconds, positions, model_batch.seconds / len(positions))
        batch_images[positions[0]].append(len(positions))
        padding[positions[0]].append(model_batch.padding)
    return {
        WORKER_COLUMN: pa.array([worker] * batch.num_rows, pa.string()),
        INPUT_BYTES_COLUMN: batch.column("input_bytes"),
        DECODE_SECONDS_COLUMN: batch.column("decode_seconds"),
        MODEL_SECONDS_COLUMN: pa.array(model_seconds, from_pandas=True),
        BATCH_IMAGES_COLUMN: pa.array([values or None for values in batch_images], pa.list_(pa.int32())),
        BATCH_PADDING_COLUMN: pa.array([values or None for values in padding], pa.list_(pa.float64())),
        BATCH_SIZE_COLUMN: pa.array(np.full(batch.num_rows, batch_size, np.int32)),
        DEVICE_BUSY_COLUMN: pa.array([device_busy if i == 0 and ran else None for i in range(batch.num_rows)], pa.float64()),
    }
