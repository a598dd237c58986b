"""`ray-detect export RESULTS_DIR --format coco --out FILE.json` or `--format voc --out DIR`.

COCO: one detection JSON with `images` (id, file_name relative to the images' common folder, width,
height, and the full `path`), `categories` (see app.reader.categories) and `annotations` (bbox as
[x, y, width, height] in pixels, area, score, iscrowd 0). VOC: one Pascal VOC XML per image, named after
the image's file stem, with 1-based inclusive integer pixel coordinates and each box's score. Rows of
images that could not be read are left out and counted on stderr. FILE or DIR may be local or a URI.
"""

import json
import sys
import xml.etree.ElementTree as ET
from collections import Counter

from app import coco, storage
from app.exit_codes import CommandParser
from app.output import reader

PROG = "ray-detect export"
FORMATS = ("coco", "voc")


def to_coco(results: reader.Results, rows: list[dict]) -> dict:
    """The COCO detection document for the rows that were read."""
    root = reader.common_folder([row["path"] for row in rows])
    images, annotations = [], []
    for image_id, row in enumerate(rows, start=1):
        images.append(
            {
                "id": image_id,
                "file_name": reader.frame_name(row)[len(root):],
                "width": row["width"],
                "height": row["height"],
                "path": row["path"],
                # A video's frame: its index and time in the video at `path`.
                **({"frame_index": row["frame_index"], "frame_time_s": row["frame_time_s"]}
                   if row.get("frame_time_s") is not None else {}),
            }
        )
        for box, score, label in zip(row["boxes"], row["scores"], row["labels"]):
            annotations.append(coco.annotation(len(annotations) + 1, image_id, label, box, score=score))
    return {
        "info": {
            "description": f"ray-detect detections from {results.uri}",
            "model": results.manifest.get("model", {}).get("name"),
            "weights": results.manifest.get("model", {}).get("weights"),
        },
        "images": images,
        "annotations": annotations,
        "categories": coco.categories(reader.categories(results)),
    }


def to_voc(row: dict) -> bytes:
    """One Pascal VOC annotation for a row.

    VOC counts pixels from 1 with inclusive corners, so a box [x1, y1, x2, y2] in continuous pixel
    coordinates becomes xmin = round(x1) + 1, xmax = round(x2) (and likewise for y)."""
    folder, _, name = reader.frame_name(row).rpartition("/")
    annotation = ET.Element("annotation")
    ET.SubElement(annotation, "folder").text = folder.rpartition("/")[2]
    ET.SubElement(annotation, "filename").text = name
    ET.SubElement(annotation, "path").text = row["path"]
    ET.SubElement(ET.SubElement(annotation, "source"), "database").text = "ray-detect"
    size = ET.SubElement(annotation, "size")
    for key, value in (("width", row["width"]), ("height", row["height"]), ("depth", 3)):
        ET.SubElement(size, key).text = str(value)
    ET.SubElement(annotation, "segmented").text = "0"
    for (x1, y1, x2, y2), score, name in zip(row["boxes"], row["scores"], row["label_names"]):
        element = ET.SubElement(annotation, "object")
        ET.SubElement(element, "name").text = name
        ET.SubElement(element, "pose").text = "Unspecified"
        ET.SubElement(element, "truncated").text = "0"
        ET.SubElement(element, "difficult").text = "0"
        ET.SubElement(element, "score").text = f"{score:.4f}"
        box = ET.SubElement(element, "bndbox")
        corners = (("xmin", round(x1) + 1), ("ymin", round(y1) + 1), ("xmax", round(x2)), ("ymax", round(y2)))
        for key, value in corners:
            ET.SubElement(box, key).text = str(value)
    ET.indent(annotation)
    return ET.tostring(annotation, encoding="utf-8", xml_declaration=True) + b"\n"


def voc_names(rows: list[dict]) -> list[str]:
    """XML file names: the image's stem, or its path below the common folder where stems collide."""
    stems = Counter(reader.file_stem(reader.frame_name(row)) for row in rows)
    root = reader.common_folder([row["path"] for row in rows])
    names = []
    for row in rows:
        stem = reader.file_stem(reader.frame_name(row))
        if stems[stem] > 1:
            stem = reader.file_stem(reader.frame_name(dict(row, path=row["path"][len(root):].replace("/", "__"))))
        names.append(stem + ".xml")
    return names


def export(results_uri: str, format: str, out_uri: str) -> tuple[int, int, int]:
    """Write the export; returns (images written, detections written, error rows left out)."""
    results = reader.open_results(results_uri)
    all_rows = results.rows()
    rows = [row for row in all_rows if row["error_kind"] is None]
    out = reader.output_location(results, out_uri)
    try:
        if format == "coco":
            parent = out.path.rpartition("/")[0]
            if parent:
                out.filesystem.create_dir(parent, recursive=True)
            document = to_coco(results, rows)
            reader.write_bytes(out, out.path, json.dumps(document).encode())
        else:
            out.filesystem.create_dir(out.path, recursive=True)
            for row, name in zip(rows, voc_names(rows)):
                reader.write_bytes(out, out.join(name), to_voc(row))
    except (storage.StorageError, OSError) as error:
        raise reader.ResultsError(f"cannot write to --out {out_uri}: {error}") from None
    return len(rows), sum(len(row["scores"]) for row in rows), len(all_rows) - len(rows)


def main(argv=None) -> None:
    parser = CommandParser(prog=PROG, description="Export detections as COCO JSON or Pascal VOC XML.")
    parser.add_argument("results", metavar="RESULTS_DIR", help="output.path of a `python -m app` run")
    parser.add_argument("--format", required=True, choices=FORMATS, help="coco: one JSON file; voc: a folder of XML")
    parser.add_argument("--out", required=True, metavar="FILE_OR_DIR", help="FILE.json for coco, DIR for voc")
    args = parser.parse_args(argv)
    try:
        images, detections, errors = export(args.results, args.format, args.out)
    except reader.ResultsError as error:
        parser.error(str(error))
    if errors:
        print(f"{PROG}: left out {errors} image{'s' if errors != 1 else ''} that could not be read", file=sys.stderr)
    print(f"{PROG}: {images} images, {detections} detections → {args.out} ({args.format})")


if __name__ == "__main__":
    from app import cli

    sys.exit(cli.main(["export", *sys.argv[1:]]))
