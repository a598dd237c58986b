"""The CPU stage: read each file, decode it to RGB uint8 at the model's input size, or say why not.

Every input row comes out as exactly one row: pixels on success, an error kind (app.result_schema's
vocabulary) and message otherwise. `pixels` reads the decoded pixels back out of such rows.
"""

import io
import math
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import ray
from PIL import Image, ImageOps, UnidentifiedImageError

from app import storage
from app.config import IMAGE_EXTENSIONS, image_formats
from app.result_schema import (
    CORRUPT_IMAGE,
    EMPTY_FILE,
    NOT_AN_IMAGE,
    REFUSED,
    TOO_LARGE,
    TOO_MANY_PIXELS,
    TRANSIENT,
    UNREADABLE,
)
from app.retry import RetryBudgetSpent, is_refused, is_transient, with_retries
from app.tiling import TilingOptions, tile_grid

DECODED_SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("width", pa.int32()),  # original size, after EXIF orientation
        ("height", pa.int32()),
        ("pixels", pa.binary()),  # HWC uint8 RGB at pixel_height x pixel_width (read back by `pixels`)
        ("pixel_width", pa.int32()),
        ("pixel_height", pa.int32()),
        # A tiled image (tiling=tiles): its HWC uint8 RGB at full size (width x height), and its tiles as
        # [x1, y1, x2, y2, ...] (app.tiling.tile_grid); `pixels` then holds the whole-image pass, if any.
        ("scene", pa.large_binary()),  # 64-bit offsets: a scene may pass 2 GiB
        ("tiles", pa.list_(pa.int32())),
        ("error_kind", pa.string()),
        ("error", pa.string()),
        # For the run's metrics (app.metrics): the bytes read (null when the file was not read) and the
        # seconds it took to read and decode.
        ("input_bytes", pa.int64()),
        ("decode_seconds", pa.float64()),
        # A video's frame (app.video); null for images.
        ("frame_index", pa.int64()),
        ("frame_time_s", pa.float64()),
        ("video_version", pa.string()),
    ]
)


# The formats of the default data.extensions: BMP, GIF, JPEG, PNG, TIFF, WEBP.
DEFAULT_FORMATS = image_formats(IMAGE_EXTENSIONS)


@dataclass(frozen=True)
class DecodeOptions:
    """How the CPU stage reads and sizes images."""

    max_file_bytes: int
    max_image_pixels: int
    # Model input size; None keeps the original size.
    min_size: Optional[int] = None
    max_size: Optional[int] = None
    # Tries of a read that fails for a reason that may pass (app.retry); 1 = no retry.
    read_attempts: int = 1
    # tiling=tiles: an image larger than a tile is decoded at full size, with its tile grid.
    tiling: Optional[TilingOptions] = None
    # The Pillow formats that may decode a file (image_formats of data.extensions): a file of another
    # format (PostScript, PSD, PCX, ... named .jpg) is not an image here, and no other decoder parses it.
    formats: tuple[str, ...] = DEFAULT_FORMATS


class ImageError(Exception):
    """An input that cannot become an image; `kind` names the reason."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def model_input_size(width: int, height: int, min_size: int, max_size: int) -> tuple[int, int]:
    """The (width, height) FasterRCNN's transform scales an image to: shorter side to min_size,
    unless the longer side would then exceed max_size. The same arithmetic as torchvision's (sizes
    rounded down), so that the model finds images already at its size and does not resize them again."""
    scale = min(min_size / min(width, height), max_size / max(width, height))
    return max(1, math.floor(width * scale)), max(1, math.floor(height * scale))


# EXIF orientations that turn the stored image a quarter turn: its width becomes the height.
QUARTER_TURNS = {5, 6, 7, 8}
EXIF_ORIENTATION = 0x0112


def read_file(filesystem: pafs.FileSystem, path: str, size: Optional[int], options: DecodeOptions,
              raw_path: Optional[bytes] = None, budget: Optional[ray.actor.ActorHandle] = None) -> bytes:
    """The file's bytes. `size` comes from the listing (None from a manifest without sizes); a local
    name that is not valid UTF-8 is opened by its bytes, `raw_path`. A read that fails for a reason that
    may pass is tried options.read_attempts times, each retry taken from the run's budget (app.retry).
    Every failure is an ImageError: TRANSIENT when it may pass or the read itself was interrupted (never a
    verdict), REFUSED when storage refused it (app.output.verdicts decides), UNREADABLE otherwise."""
    if size is not None and size > options.max_file_bytes:
        raise ImageError(TOO_LARGE, f"file is {size} bytes, over data.max_file_bytes={options.max_file_bytes}")

    def read() -> bytes:
        if raw_path is not None:
            with open(raw_path, "rb") as file:
                return file.read(options.max_file_bytes + 1)
        with filesystem.open_input_stream(path) as stream:
            return stream.read(options.max_file_bytes + 1)

    try:
        data = with_retries(read, options.read_attempts, budget, path=path)
    except RetryBudgetSpent:
        raise
    except OSError as error:
        if is_transient(error, path):
            raise ImageError(TRANSIENT, f"still failing after {options.read_attempts} attempts: {error}") from error
        if is_refused(error, path):
            raise ImageError(REFUSED, str(error)) from error
        raise ImageError(UNREADABLE, str(error)) from error
    except Exception as error:  # the read itself went wrong (the retry budget's actor died, ...), not the file
        raise ImageError(TRANSIENT, f"the read was interrupted: {type(error).__name__}: {error}") from error
    if len(data) > options.max_file_bytes:
        raise ImageError(TOO_LARGE, f"file is over data.max_file_bytes={options.max_file_bytes} bytes")
    if not data:
        raise ImageError(EMPTY_FILE, "file is empty")
    return data


# Rows of a large image converted at a time (16-bit grayscale to 8 bits, a scene to its RGB bytes): a
# band stays a few MB however large the image is.
BAND_ROWS = 64


def to_8bit_gray(image: Image.Image) -> Image.Image:
    """A 16- or 32-bit grayscale image (modes I;16*, I, F) as 8-bit grayscale (L), scaled, not clipped as
    Pillow's convert would: values over 255 are read as 16-bit, 0..65535 to 0..255. A band of rows at a
    time in float32, so that besides the image only its 8-bit copy is full-size (1 byte a pixel)."""
    scale = np.float32(255 / 65535 if image.getextrema()[1] > 255 else 1)
    gray = np.empty((image.height, image.width), np.uint8)
    for top in range(0, image.height, BAND_ROWS):
        bottom = min(top + BAND_ROWS, image.height)
        band = np.array(image.crop((0, top, image.width, bottom)), dtype=np.float32)
        band *= scale
        np.clip(band, 0, 255, out=band)
        gray[top:bottom] = np.rint(band, out=band)
    return Image.fromarray(gray, mode="L")


def to_rgb(image: Image.Image, size: Optional[tuple[int, int]] = None) -> Image.Image:
    """Any Pillow mode (L, LA, P, RGBA, CMYK, I;16, I, F, ...) as 8-bit RGB, resized to `size` if given.
    Each step closes the image it replaces, freeing its pixels at once (the caller's image included), so
    that at most two full-size images exist at a time. Grayscale is resized before it becomes RGB, while
    it takes 1 byte a pixel (Pillow keeps RGB, RGBA and CMYK in 4)."""
    if image.mode.startswith("I") or image.mode == "F":
        image = replaced(image, to_8bit_gray(image))
    if image.mode == "L" and size is not None and size != image.size:
        image = replaced(image, image.resize(size, Image.Resampling.BILINEAR))
    if image.mode != "RGB":
        image = replaced(image, image.convert("RGB"))
    if size is not None and size != image.size:
        image = replaced(image, image.resize(size, Image.Resampling.BILINEAR))
    return image


def rgb_array(image: Image.Image) -> np.ndarray:
    """An RGB image's pixels as one HWC uint8 array, copied a band of rows at a time: Pillow's tobytes
    would hold them twice (it joins its output's chunks), with the image beside them."""
    array = np.empty((image.height, image.width, 3), np.uint8)
    for top in range(0, image.height, BAND_ROWS):
        bottom = min(top + BAND_ROWS, image.height)
        with image.crop((0, top, image.width, bottom)) as band:
            array[top:bottom] = np.asarray(band)
    return array


def replaced(old: Image.Image, new: Image.Image) -> Image.Image:
    """`new`, once `old`'s pixels are freed."""
    old.close()
    return new


# data.max_image_pixels is the decompression-bomb guard (open_image), not Pillow's 89 MP warning and
# 179 MP error: tiled scenes go past them.
Image.MAX_IMAGE_PIXELS = None


def open_image(data: bytes, options: DecodeOptions) -> tuple[Image.Image, int, int]:
    """The image in `data`, not decoded yet, and its width and height after EXIF orientation."""
    try:
        image = Image.open(io.BytesIO(data), formats=list(options.formats))
    except UnidentifiedImageError as error:
        raise ImageError(NOT_AN_IMAGE, f"not an image of the formats data.extensions names ({', '.join(options.formats)})") from error
    except Image.DecompressionBombError as error:
        raise ImageError(TOO_MANY_PIXELS, str(error)) from error
    pixels = image.width * image.height
    if pixels > options.max_image_pixels:
        raise ImageError(
            TOO_MANY_PIXELS,
            f"{image.width}x{image.height} is {pixels} pixels, over data.max_image_pixels={options.max_image_pixels}",
        )
    try:
        width, height = image.size
        if image.getexif().get(EXIF_ORIENTATION) in QUARTER_TURNS:
            width, height = height, width
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageError(CORRUPT_IMAGE, f"cannot decode: {error}") from error
    return image, width, height


def to_oriented_rgb(image: Image.Image, size: Optional[tuple[int, int]]) -> Image.Image:
    """An opened image decoded, turned by its EXIF orientation and made RGB at `size` (None: its own)."""
    try:
        if size is not None:
            # A JPEG much larger than the model's size is decoded at 1/2, 1/4 or 1/8 scale (DCT scaling),
            # never below that size: a 12 MP photo decodes a quarter of its pixels or fewer.
            turned = image.getexif().get(EXIF_ORIENTATION) in QUARTER_TURNS
            image.draft(None, size[::-1] if turned else size)
        ImageOps.exif_transpose(image, in_place=True)  # no copy when the image needs no turn
        return to_rgb(image, size)
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageError(CORRUPT_IMAGE, f"cannot decode: {error}") from error


def decode(data: bytes, options: DecodeOptions) -> tuple[Image.Image, int, int]:
    """Decode bytes to an RGB image at model size; returns it with the original width and height."""
    image, width, height = open_image(data, options)
    return to_oriented_rgb(image, model_size(width, height, options)), width, height


def model_size(width: int, height: int, options: DecodeOptions) -> Optional[tuple[int, int]]:
    """The size an image is decoded at to be detected whole: the model's input size, or None (its own)."""
    if options.min_size is None or options.max_size is None:
        return None
    return model_input_size(width, height, options.min_size, options.max_size)


def decode_into(row: dict, data: bytes, options: DecodeOptions) -> None:
    """Fill a DECODED_SCHEMA row with the image in `data`: its pixels at model size, or, when it is
    tiled, its pixels at full size with its tile grid, and the whole-image pass at model size (if asked
    for and resized on the CPU: on the device otherwise, from the full-size pixels)."""
    image, row["width"], row["height"] = open_image(data, options)
    fill_pixels(row, image, options)


def fill_pixels(row: dict, image: Image.Image, options: DecodeOptions) -> None:
    """decode_into's filling of a row from an opened image (or a video's decoded frame) whose original
    size the row holds already."""
    size = model_size(row["width"], row["height"], options)
    tiling = options.tiling
    if tiling is None or not tiling.tiles(row["width"], row["height"]):
        image = to_oriented_rgb(image, size)
        row["pixels"], (row["pixel_width"], row["pixel_height"]) = image.tobytes(), image.size
        image.close()
        return
    image = to_oriented_rgb(image, None)
    row["tiles"] = tile_grid(image.width, image.height, tiling.tile_size, tiling.overlap).reshape(-1).tolist()
    if tiling.full_image and size is not None:
        with image.resize(size, Image.Resampling.BILINEAR) as whole:
            row["pixels"], (row["pixel_width"], row["pixel_height"]) = whole.tobytes(), whole.size
    row["scene"] = rgb_array(image)
    image.close()


def decode_images(
    batch: pa.Table, *, filesystem: pafs.FileSystem, uri_prefix: str, options: DecodeOptions,
    budget: Optional[ray.actor.ActorHandle] = None,
) -> pa.Table:
    """Ray Data UDF: input rows (app.listing.INPUT_SCHEMA) in, rows of DECODED_SCHEMA out, one for one.
    An input that the listing already found unusable passes through as its error row, unopened. `budget`
    is the run's retry budget (app.retry.RetryBudget); when it is spent, RetryBudgetSpent stops the run."""
    rows = {name: [] for name in DECODED_SCHEMA.names}
    filesystem = storage.for_image_reads(filesystem)
    columns = [batch.column(name).to_pylist() for name in ("path", "size", "error_kind", "error", "raw_path")]
    for path, size, kind, message, raw_path in zip(*columns):
        row = dict.fromkeys(DECODED_SCHEMA.names)
        row["path"] = uri_prefix + path
        started = time.perf_counter()
        try:
            if kind is not None:
                raise ImageError(kind, message)
            data = read_file(filesystem, path, size, options, raw_path, budget)
            row["input_bytes"] = len(data)
            decode_into(row, data, options)
        except ImageError as error:
            row["error_kind"], row["error"] = error.kind, str(error)
        except RetryBudgetSpent:
            raise
        except Exception as error:  # a decoder bug or an exotic file must still end as one row
            row["error_kind"], row["error"] = CORRUPT_IMAGE, f"{type(error).__name__}: {error}"
        row["decode_seconds"] = time.perf_counter() - started
        for name, value in row.items():
            rows[name].append(value)
    scenes = rows.pop("scene")
    table = pa.table(rows, schema=DECODED_SCHEMA.remove(DECODED_SCHEMA.get_field_index("scene")))
    return table.add_column(DECODED_SCHEMA.get_field_index("scene"), DECODED_SCHEMA.field("scene"), scene_column(scenes))


def scene_column(scenes: list[Optional[np.ndarray]]) -> pa.Array:
    """The scenes as the large binary column, a lone one without a copy (a decode call of tiling has one)."""
    present = [scene.reshape(-1) for scene in scenes if scene is not None]
    if not present:
        return pa.nulls(len(scenes), pa.large_binary())
    lengths = [0 if scene is None else scene.size for scene in scenes]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    data = present[0] if len(present) == 1 else np.concatenate(present)
    valid = np.array([scene is not None for scene in scenes])
    validity = None if valid.all() else pa.py_buffer(np.packbits(valid, bitorder="little"))
    return pa.Array.from_buffers(pa.large_binary(), len(scenes), [validity, pa.py_buffer(offsets), pa.py_buffer(data)],
                                 null_count=int((~valid).sum()))


def pixels(batch: pa.Table, rows: Sequence[int], column: str = "pixels") -> list[np.ndarray]:
    """The decoded pixels of the given rows as HWC uint8 arrays: read-only views of the Arrow buffers,
    nothing copied. `column` is "pixels" (pixel_width x pixel_height) or "scene" (width x height)."""
    starts, data = [], []
    for chunk in batch.column(column).chunks:
        _, offsets, values = chunk.buffers()
        offset_type = np.int64 if pa.types.is_large_binary(chunk.type) else np.int32
        offsets = np.frombuffer(offsets, offset_type)[chunk.offset : chunk.offset + len(chunk) + 1]
        values = np.frombuffer(values, np.uint8) if values is not None else np.zeros(0, np.uint8)
        starts.extend(zip(offsets[:-1], offsets[1:]))
        data.extend([values] * len(chunk))
    prefix = "pixel_" if column == "pixels" else ""
    widths = batch.column(prefix + "width").to_numpy(zero_copy_only=False)
    heights = batch.column(prefix + "height").to_numpy(zero_copy_only=False)
    return [data[i][starts[i][0] : starts[i][1]].reshape(int(heights[i]), int(widths[i]), 3) for i in rows]
