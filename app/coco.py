"""The COCO detection format, written in one place for export (detections) and evaluate (ground truth and
detections for pycocotools)."""

from typing import Optional


def annotation(
    annotation_id: int, image_id: int, label: int, box: list[float], score: Optional[float] = None, crowd: bool = False
) -> dict:
    """A COCO annotation of a box [x1, y1, x2, y2] in pixels: bbox [x, y, width, height] and its area;
    `score` for a detection (before iscrowd, the key order export has always written)."""
    x1, y1, x2, y2 = box
    width, height = x2 - x1, y2 - y1
    entry = {"id": annotation_id, "image_id": image_id, "category_id": label, "bbox": [x1, y1, width, height],
             "area": width * height}
    if score is not None:
        entry["score"] = score
    entry["iscrowd"] = int(crowd)
    return entry


def categories(names: dict[int, str]) -> list[dict]:
    """COCO's `categories` list of label id → name."""
    return [{"id": label, "name": name} for label, name in names.items()]
