"""Tiled detection (tiling=tiles), for large images whose objects are a few dozen pixels: the grid of
tiles an image is detected in, and the merging of the detections that overlapping tiles (and the
whole-image pass) made of one object.

The decode task decides whether an image is tiled and lays out its grid (`tile_grid`); the detector
crops the tiles from the image's full-resolution pixels, moves each tile's boxes by the tile's offset
into the image's pixels, and merges them (`merge_detections`).

Both follow SAHI (sahi.slicing.get_slice_bboxes, sahi.postprocess.combine), so that a run gives the rows
SAHI's get_sliced_prediction gives with the same model and settings (tests/test_tiling.py checks both).
"""

from dataclasses import dataclass
from typing import NamedTuple, Optional

import numpy as np

from app.config import MatchMetric, MergeMethod, TilingConfig


@dataclass(frozen=True)
class TilingOptions:
    """tiling's settings, read once a config is checked (app.config.check_tiling)."""

    tile_size: int
    overlap: float
    full_image: bool
    merge: MergeMethod
    match_metric: MatchMetric
    match_threshold: float
    class_aware: bool

    @classmethod
    def from_config(cls, tiling: TilingConfig) -> Optional["TilingOptions"]:
        """The options of tiling=tiles; None with tiling=none."""
        if not tiling.enabled:
            return None
        return cls(tiling.tile_size, tiling.overlap, tiling.full_image, MergeMethod(tiling.merge),
                   MatchMetric(tiling.match_metric), tiling.match_threshold, tiling.class_aware)

    def tiles(self, width: int, height: int) -> bool:
        """Whether an image of this size is tiled: one no larger than a tile is detected whole, as without tiling."""
        return width > self.tile_size or height > self.tile_size


def tile_starts(length: int, size: int, overlap: float) -> list[int]:
    """Where the tiles start along one side of `length` pixels: every size - int(overlap * size) pixels,
    the last tile moved back to end at the edge; one tile when the side is no longer than a tile."""
    step = size - int(overlap * size)
    starts = [0]
    while starts[-1] + size < length:
        starts.append(min(starts[-1] + step, length - size))
    return starts


def tile_grid(width: int, height: int, size: int, overlap: float) -> np.ndarray:
    """The tiles of a width x height image as rows of [x1, y1, x2, y2], row by row from the top left.
    Every tile has the same size: size x size, or the image's side where it is shorter."""
    return np.array([[x, y, min(x + size, width), min(y + size, height)]
                     for y in tile_starts(height, size, overlap) for x in tile_starts(width, size, overlap)], np.int32)


class Detections(NamedTuple):
    """Detections of one image: boxes [x1, y1, x2, y2] in its pixels, scores and label ids."""

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray


def overlaps(box: np.ndarray, area: np.float32, others: np.ndarray, other_areas: np.ndarray, metric: MatchMetric) -> np.ndarray:
    """match_metric between one box and each of `others`, in float32 (0 where the divisor is 0)."""
    width = np.maximum(np.float32(0), np.minimum(box[2], others[:, 2]) - np.maximum(box[0], others[:, 0]))
    height = np.maximum(np.float32(0), np.minimum(box[3], others[:, 3]) - np.maximum(box[1], others[:, 1]))
    intersection = width * height
    divisor = area + other_areas - intersection if metric == MatchMetric.iou else np.minimum(area, other_areas)
    return np.divide(intersection, divisor, out=np.zeros_like(intersection), where=divisor > 0)


def still_matches(merged: np.ndarray, box: np.ndarray, metric: MatchMetric, threshold: float) -> bool:
    """Whether a box still matches the box merged so far, in float64 (SAHI's has_match)."""
    intersection = np.prod(np.clip(np.minimum(merged[2:], box[2:]) - np.maximum(merged[:2], box[:2]), 0, None))
    areas = np.prod(merged[2:] - merged[:2]), np.prod(box[2:] - box[:2])
    divisor = sum(areas) - intersection if metric == MatchMetric.iou else min(areas)
    with np.errstate(divide="ignore", invalid="ignore"):
        return bool(intersection / divisor >= threshold)


def merge_group(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, options: TilingOptions) -> list[tuple]:
    """Greedy suppression or merging within one group of detections (one label, or all of them).

    Boxes are taken by score, highest first (ties by x1, y1, x2, y2); each one not yet taken takes the
    later ones whose match_metric with it is at least match_threshold (computed in float32). nms drops
    them; nmm merges them into it one by one, each while it still matches the box merged so far (in
    float64): the union box, the higher score, and the merged box's label only if its score is strictly
    higher (SAHI's rule: on a tie, the label of the box merged in). Returns (box, score, label) tuples."""
    narrow = boxes.astype(np.float32)
    areas = (narrow[:, 2] - narrow[:, 0]) * (narrow[:, 3] - narrow[:, 1])
    order = np.lexsort((narrow[:, 3], narrow[:, 2], narrow[:, 1], narrow[:, 0], -scores))
    free = np.ones(len(boxes), bool)
    kept = []
    for position, i in enumerate(order):
        if not free[i]:
            continue
        rest = order[position + 1 :]
        rest = rest[free[rest]]
        matched = rest[overlaps(narrow[i], areas[i], narrow[rest], areas[rest], options.match_metric) >= options.match_threshold]
        free[matched] = False
        box, score, label = boxes[i], scores[i], labels[i]
        if options.merge == MergeMethod.nmm:
            for j in matched:
                if still_matches(box, boxes[j], options.match_metric, options.match_threshold):
                    box = np.concatenate([np.minimum(box[:2], boxes[j][:2]), np.maximum(box[2:], boxes[j][2:])])
                    label = label if score > scores[j] else labels[j]
                    score = max(score, scores[j])
        kept.append((box, score, label))
    return kept


def merge_detections(found: Detections, options: TilingOptions) -> Detections:
    """One detection per object (merge_group, per label when class_aware), highest score first. Boxes
    come in float64: a box moved into a large image's pixels keeps the digits float32 would round."""
    groups = [np.flatnonzero(found.labels == label) for label in np.unique(found.labels)] if options.class_aware \
        else [np.arange(len(found.labels))]
    kept = [detection for group in groups
            for detection in merge_group(found.boxes[group], found.scores[group], found.labels[group], options)]
    kept.sort(key=lambda detection: -detection[1])
    return Detections(
        np.array([box for box, _, _ in kept], np.float32).reshape(-1, 4),
        np.array([score for _, score, _ in kept], np.float32),
        np.array([label for _, _, label in kept], np.int64),
    )
