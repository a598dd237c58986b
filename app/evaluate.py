"""`ray-detect evaluate RESULTS_DIR --ground-truth PATH [--json FILE]`: COCO-style detection metrics.

Ground truth is a folder of Pascal VOC XML files (searched recursively) or a COCO JSON file. Results rows
and ground-truth images are matched by file stem: the image's name without folder and extension (VOC:
the `<filename>` element, else the XML file's own name; COCO: `file_name`). Only images found on both
sides are evaluated; rows of images that could not be read count as images with no detections.

Ground-truth class names are matched to the model's category names case-insensitively, with Pascal VOC's
six different spellings mapped onto COCO's (VOC_TO_COCO); classes the model does not know are left out
and listed on stderr. VOC `difficult` objects, like COCO crowd regions, are neither required nor
penalised. The numbers are pycocotools' COCOeval: mAP@[.5:.95], mAP@.5 and per-class AP (area "all",
up to 100 detections per image).
"""

import contextlib
import io
import json
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow.fs as pafs

from app import coco, storage
from app.exit_codes import CommandParser
from app.output import reader

PROG = "ray-detect evaluate"
DECIMALS = 6
# Pascal VOC class names that COCO spells differently; the other 14 VOC classes have COCO's names.
VOC_TO_COCO = {
    "aeroplane": "airplane",
    "diningtable": "dining table",
    "motorbike": "motorcycle",
    "pottedplant": "potted plant",
    "sofa": "couch",
    "tvmonitor": "tv",
}


@dataclass
class GroundTruthObject:
    name: str
    box: list[float]  # [x1, y1, x2, y2], continuous pixel coordinates
    ignored: bool = False  # VOC difficult or COCO crowd


@dataclass
class GroundTruthImage:
    stem: str
    width: int
    height: int
    objects: list[GroundTruthObject] = field(default_factory=list)


def _text(element, tag, default=None):
    found = element.find(tag)
    return found.text.strip() if found is not None and found.text else default


def parse_voc(data: bytes, xml_name: str) -> GroundTruthImage:
    """One VOC annotation; its 1-based inclusive integer corners become continuous coordinates."""
    root = ET.fromstring(data)
    stem = reader.file_stem(_text(root, "filename") or xml_name)
    size = root.find("size")
    image = GroundTruthImage(
        stem, int(float(_text(size, "width", 0))) if size is not None else 0,
        int(float(_text(size, "height", 0))) if size is not None else 0,
    )
    for element in root.iter("object"):
        box = element.find("bndbox")
        xmin, ymin, xmax, ymax = (float(_text(box, key)) for key in ("xmin", "ymin", "xmax", "ymax"))
        image.objects.append(
            GroundTruthObject(_text(element, "name", ""), [xmin - 1, ymin - 1, xmax, ymax], _text(element, "difficult") == "1")
        )
    return image


def parse_coco(document: dict) -> list[GroundTruthImage]:
    names = {category["id"]: category["name"] for category in document.get("categories", [])}
    images = {
        entry["id"]: GroundTruthImage(reader.file_stem(entry["file_name"]), entry.get("width", 0), entry.get("height", 0))
        for entry in document["images"]
    }
    for annotation in document.get("annotations", []):
        x, y, width, height = annotation["bbox"]
        images[annotation["image_id"]].objects.append(
            GroundTruthObject(names[annotation["category_id"]], [x, y, x + width, y + height], bool(annotation.get("iscrowd")))
        )
    return list(images.values())


def load_ground_truth(uri: str) -> list[GroundTruthImage]:
    """A COCO JSON file, or every VOC XML file under a folder."""
    try:
        location = storage.resolve(uri)
        info = location.filesystem.get_file_info(location.path)
        if info.type == pafs.FileType.NotFound:
            raise reader.ResultsError(f"ground truth {uri} does not exist")
        if info.type == pafs.FileType.File:
            with location.filesystem.open_input_stream(location.path) as stream:
                return parse_coco(json.loads(stream.read()))
        selector = pafs.FileSelector(location.path, recursive=True)
        files = sorted(
            entry.path for entry in location.filesystem.get_file_info(selector)
            if entry.type == pafs.FileType.File and entry.path.lower().endswith(".xml")
        )
        if not files:
            raise reader.ResultsError(f"ground truth folder {uri} holds no .xml files")
        images = []
        for path in files:
            with location.filesystem.open_input_stream(path) as stream:
                images.append(parse_voc(stream.read(), path.rpartition("/")[2]))
        return images
    except (storage.StorageError, OSError) as error:
        raise reader.ResultsError(f"cannot read ground truth {uri}: {error}") from None
    except (ValueError, KeyError, TypeError, AttributeError, ET.ParseError) as error:
        raise reader.ResultsError(f"ground truth {uri} is neither COCO JSON nor Pascal VOC XML: {error!r}") from None


def count_images(count: int) -> str:
    return f"{count} image{'' if count == 1 else 's'}"


def note(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr)


def evaluate(results: "reader.Results | str", ground_truth_uri: str) -> dict:
    """Match, map and score; returns the numbers (see --json), with notes on stderr."""
    if isinstance(results, str):
        results = reader.open_results(results)
    truth = load_ground_truth(ground_truth_uri)
    categories = reader.categories(results)
    by_name = {name.lower(): label for label, name in categories.items()}

    rows = {}
    for row in results.rows():
        rows.setdefault(reader.file_stem(reader.frame_name(row)), row)
    truth_stems = {image.stem for image in truth}
    matched = [image for image in truth if image.stem in rows]
    if not matched:
        raise reader.ResultsError(
            f"no image of {results.uri} matches one in {ground_truth_uri} by file name (stem)"
        )
    if len(matched) < len(truth):
        note(f"{count_images(len(truth) - len(matched))} of the ground truth not in the results; left out")
    unmatched_rows = sum(1 for stem in rows if stem not in truth_stems)
    if unmatched_rows:
        note(f"{count_images(unmatched_rows)} of the results not in the ground truth; left out")
    unread = sum(1 for image in matched if rows[image.stem]["error_kind"] is not None)
    if unread:
        note(f"{count_images(unread)} could not be read; their objects count as missed")

    gt_images, gt_annotations, detections, unmapped = [], [], [], Counter()
    for image_id, image in enumerate(matched, start=1):
        row = rows[image.stem]
        gt_images.append({"id": image_id, "file_name": image.stem, "width": image.width, "height": image.height})
        for obj in image.objects:
            name = obj.name.strip().lower()
            label = by_name.get(name, by_name.get(VOC_TO_COCO.get(name, "")))
            if label is None:
                unmapped[obj.name] += 1
                continue
            gt_annotations.append(coco.annotation(len(gt_annotations) + 1, image_id, label, obj.box, crowd=obj.ignored))
        for box, score, label in zip(row["boxes"], row["scores"], row["labels"]):
            if label in categories:
                detections.append(coco.annotation(len(detections) + 1, image_id, label, box, score=score))
    if unmapped:
        listed = ", ".join(f"{name} ({count})" for name, count in sorted(unmapped.items()))
        note(f"ground-truth classes the model does not know, left out: {listed}")
    if not any(not annotation["iscrowd"] for annotation in gt_annotations):
        raise reader.ResultsError("no ground-truth object of a class the model knows in the matched images")

    # pycocotools comes with the eval extra: imported where used, so that importing this module works
    # without it and app.cli can report it missing in one line.
    from pycocotools.cocoeval import COCOeval

    coco_categories = coco.categories(categories)
    ground_truth = coco_index({"images": gt_images, "annotations": gt_annotations, "categories": coco_categories})
    predicted = coco_index({"images": gt_images, "annotations": detections, "categories": coco_categories})
    evaluation = COCOeval(ground_truth, predicted, iouType="bbox")
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools narrates every step on stdout
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()

    precision = evaluation.eval["precision"]  # [IoU threshold, recall, category, area, max detections]
    gt_counts = Counter(a["category_id"] for a in gt_annotations if not a["iscrowd"])
    dt_counts = Counter(d["category_id"] for d in detections)
    per_class = {}
    for k, label in enumerate(evaluation.params.catIds):
        if gt_counts[label]:
            per_class[categories[label]] = {
                "ap": mean_precision(precision[:, :, k, 0, -1]),
                "ap_50": mean_precision(precision[0, :, k, 0, -1]),
                "ground_truth": gt_counts[label],
                "detections": dt_counts[label],
            }
    return {
        "results": results.uri,
        "ground_truth": ground_truth_uri,
        "images": len(matched),
        "map": rounded(evaluation.stats[0]),
        "map_50": rounded(evaluation.stats[1]),
        "per_class": per_class,
        "unmapped_classes": dict(sorted(unmapped.items())),
    }


def coco_index(dataset: dict):
    from pycocotools.coco import COCO

    index = COCO()
    index.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        index.createIndex()
    return index


def mean_precision(values: np.ndarray) -> float:
    valid = values[values > -1]
    return rounded(valid.mean()) if valid.size else float("nan")


def rounded(value) -> float:
    """6 decimals: pycocotools divides by tp + fp + machine epsilon, so a perfect score is 1 − 2e-16."""
    return round(float(value), DECIMALS)


def format_table(metrics: dict) -> str:
    width = max([len(name) for name in metrics["per_class"]] + [len("mAP"), len("class")])
    lines = [f"{'class':<{width}}  {'GT':>5}  {'detections':>10}  {'AP@[.5:.95]':>11}  {'AP@.5':>6}"]
    for name, numbers in sorted(metrics["per_class"].items()):
        lines.append(
            f"{name:<{width}}  {numbers['ground_truth']:>5}  {numbers['detections']:>10}  "
            f"{numbers['ap']:>11.3f}  {numbers['ap_50']:>6.3f}"
        )
    total_gt = sum(numbers["ground_truth"] for numbers in metrics["per_class"].values())
    total_dt = sum(numbers["detections"] for numbers in metrics["per_class"].values())
    lines.append(f"{'mAP':<{width}}  {total_gt:>5}  {total_dt:>10}  {metrics['map']:>11.3f}  {metrics['map_50']:>6.3f}")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = CommandParser(prog=PROG, description="COCO-style mAP of a results directory against ground truth.")
    parser.add_argument("results", metavar="RESULTS_DIR", help="output.path of a `python -m app` run")
    parser.add_argument("--ground-truth", required=True, metavar="PATH", help="a folder of Pascal VOC XML or a COCO JSON file")
    parser.add_argument("--json", metavar="FILE", help="also write the numbers to FILE (local or URI)")
    args = parser.parse_args(argv)
    try:
        results = reader.open_results(args.results)
        json_out = reader.output_location(results, args.json, "--json") if args.json else None
        metrics = evaluate(results, args.ground_truth)
        if json_out:
            reader.write_bytes(json_out, json_out.path, json.dumps(metrics, indent=2).encode() + b"\n")
    except reader.ResultsError as error:
        parser.error(str(error))
    except (storage.StorageError, OSError) as error:
        parser.error(f"cannot write --json {args.json}: {error}")
    print(f"{PROG}: {count_images(metrics['images'])}")
    print(format_table(metrics))


if __name__ == "__main__":
    from app import cli

    sys.exit(cli.main(["evaluate", *sys.argv[1:]]))
