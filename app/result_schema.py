"""The result row's columns, and the error kinds its `error_kind` column holds: the one definition that the
input side (listing, inventories, decode), which finds the errors, and the output side (app.output),
which stores them, both import."""

from typing import Optional

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
        # Model inputs the image took: 1 untiled; with tiling=tiles its tiles, plus 1 for the whole-image
        # pass; 0 on error. Null in rows written before the column existed.
        ("num_tiles", pa.int32()),
        ("error_kind", pa.string()),  # null on success; one of the kinds below
        ("error", pa.string()),
        # A video's frame (app.video): its index in presentation order and its time in seconds, both from the
        # stream's timestamps; and the video's size and modification time when it was read. Null for images.
        ("frame_index", pa.int64()),
        ("frame_time_s", pa.float64()),
        ("video_version", pa.string()),
    ]
)

# Error kinds, as they appear in the `error_kind` column and the run summary.
EMPTY_FILE = "empty_file"
TOO_LARGE = "too_large"
UNREADABLE = "unreadable"
NOT_AN_IMAGE = "not_an_image"
TOO_MANY_PIXELS = "too_many_pixels"
CORRUPT_IMAGE = "corrupt_image"
NOT_A_FILE = "not_a_file"  # a FIFO, socket, device or folder named like an image: never opened
# Videos (app.video): a file FFmpeg cannot open, one without a video stream, a codec FFmpeg cannot decode,
# a video over data.video.max_duration_s, and a frame that damage in the stream keeps from being decoded.
NOT_A_VIDEO = "not_a_video"
NO_VIDEO_STREAM = "no_video_stream"
UNSUPPORTED_CODEC = "unsupported_codec"
TOO_LONG = "too_long"
CORRUPT_VIDEO = "corrupt_video"
# A read that kept failing for a reason that may pass (app.retry): never committed, so a rerun reads it again.
TRANSIENT = "transient"
# A read that storage refused (not found, access denied, a rejected credential, a missing bucket): never
# committed as such. The driver commits it as UNREADABLE once another file reads fine, or stops the run
# when storage refuses everything (app.output.verdicts).
REFUSED = "refused"
# A file whose reads failed for reasons that may pass in data.transient_runs runs in a row: committed, so
# that the output finishes (data.retry_errors=[kept_failing] reads them again).
KEPT_FAILING = "kept_failing"
# The kinds of committed rows, which data.retry_errors may name (TRANSIENT and REFUSED are never committed).
COMMITTED_ERRORS = (UNREADABLE, KEPT_FAILING, EMPTY_FILE, TOO_LARGE, NOT_AN_IMAGE, TOO_MANY_PIXELS, CORRUPT_IMAGE,
                    NOT_A_FILE, NOT_A_VIDEO, NO_VIDEO_STREAM, UNSUPPORTED_CODEC, TOO_LONG, CORRUPT_VIDEO)


def frame_key(path: str, frame_index: Optional[int]) -> str:
    """What a row is the row of: an image's path; for a video's frame, the path and the frame's index. A
    video's error row of its own (no frame) has its path. No image path ends so: image names end with
    their extension."""
    return path if frame_index is None else f"{path}#frame={frame_index}"


def row_keys(rows: pa.Table) -> list[str]:
    """frame_key of each row of a table with a path column (and a frame_index column, where it holds frames)."""
    paths = rows.column("path").to_pylist()
    if "frame_index" not in rows.column_names or rows.column("frame_index").null_count == rows.num_rows:
        return paths
    return [frame_key(path, index) for path, index in zip(paths, rows.column("frame_index").to_pylist())]
