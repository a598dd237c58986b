"""The output: one Parquet row per input image, and the JSON run manifest published last."""

import json

import pyarrow as pa

RESULT_SCHEMA = pa.schema(
    [
        ("path", pa.string()),  # the input file's path or URI
        ("width", pa.int32()),  # original size in pixels, after EXIF orientation; null on error
        ("height", pa.int32()),
        ("boxes", pa.list_(pa.list_(pa.float32()))),  # [x1, y1, x2, y2] per detection, original pixels
        ("scores", pa.list_(pa.float32())),
        ("labels", pa.list_(pa.int64())),
        ("label_names", pa.list_(pa.string())),
        ("num_detections", pa.int32()),
        ("error_kind", pa.string()),  # null on success; see app/decode.py for the kinds
        ("error", pa.string()),
    ]
)

MANIFEST_NAME = "_manifest.json"
STAGING_DIR = "_staging"


def write_json(filesystem, path: str, document: dict) -> None:
    with filesystem.open_output_stream(path) as stream:
        stream.write(json.dumps(document, indent=2, sort_keys=True).encode() + b"\n")


def read_json(filesystem, path: str) -> dict:
    with filesystem.open_input_stream(path) as stream:
        return json.loads(stream.read())
