"""The CPU stage: every image mode to RGB uint8, EXIF orientation, resizing to the model's input size,
and one error row (with its kind) for each kind of bad file."""

import io
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pytest
import torch
from PIL import Image

from app.decode import (
    DECODED_SCHEMA,
    DecodeOptions,
    decode,
    decode_images,
    model_input_size,
)
from app.config import compose_config, image_formats
from app.listing import input_rows
from tests.support.images import encoded, jpeg_bytes

NO_RESIZE = DecodeOptions(max_file_bytes=10**8, max_image_pixels=10**8)


def encode(image: Image.Image, fmt: str, **save_args) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save_args)
    return buffer.getvalue()


def pixel(data: bytes, xy=(0, 0), options=NO_RESIZE):
    image, width, height = decode(data, options)
    assert image.mode == "RGB"
    return image.getpixel(xy), (width, height)


@pytest.mark.parametrize(
    "mode,value,expected",
    [
        ("L", 77, (77, 77, 77)),
        ("LA", (77, 255), (77, 77, 77)),
        ("RGBA", (10, 20, 30, 255), (10, 20, 30)),
        ("CMYK", (0, 255, 255, 0), (255, 0, 0)),
    ],
)
def test_modes_become_rgb(mode, value, expected):
    data = encode(Image.new(mode, (5, 4), value), "TIFF" if mode == "CMYK" else "PNG")
    assert pixel(data) == (expected, (5, 4))


def test_palette_image_becomes_its_colours():
    image = Image.new("P", (3, 2))
    image.putpalette([0, 0, 0, 12, 34, 56] + [0] * 762)
    image.putpixel((1, 1), 1)
    assert pixel(encode(image, "PNG"), (1, 1)) == ((12, 34, 56), (3, 2))


def test_16_bit_grayscale_is_scaled_not_clipped():
    values = np.array([[0, 32896, 65535]], dtype=np.uint16)
    data = encode(Image.fromarray(values), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    image, _, _ = decode(data, NO_RESIZE)
    assert [image.getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (128, 128, 128), (255, 255, 255)]


# A decode in a fresh process: the growth of its peak RSS (VmHWM, reset through /proc/self/clear_refs once
# the file is read) in bytes, and what it decoded.
MEASURE_DECODE = """
import sys
from app.decode import DecodeOptions, decode
def status(key):
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key))
data = open(sys.argv[1], "rb").read()
open("/proc/self/clear_refs", "w").write("5")
rss = status("VmRSS:")
image, width, height = decode(data, DecodeOptions(64 * 2**20, 40_000_000, 800, 1333))
print(status("VmHWM:") - rss, width, height, *image.size, *image.getpixel((1279, 0)))
"""


@pytest.mark.slow
def test_a_40_megapixel_16_bit_png_decodes_in_under_4_bytes_a_pixel(tmp_path):
    """The bound: the 16-bit image (2 bytes a pixel) and its 8-bit copy (1) are the only full-size arrays;
    up to 1 more for the PNG decoder and the float32 bands (measured: about 3.2). Float64 temporaries took
    about 25 bytes a pixel, a gigabyte for this file of 40 KB. Measured by RSS in a fresh process: Pillow
    allocates outside Python's allocator, where tracemalloc does not see it."""
    ramp = np.linspace(0, 65535, 8000).astype(np.uint16)
    path = tmp_path / "ramp16.png"
    Image.fromarray(np.tile(ramp, (5000, 1))).save(path)
    assert Image.open(path).mode == "I;16" and path.stat().st_size < 100_000
    result = subprocess.run([sys.executable, "-c", MEASURE_DECODE, str(path)], capture_output=True, text=True, check=True)
    growth, *decoded = map(int, result.stdout.split())
    assert decoded == [8000, 5000, 1280, 800, 255, 255, 255]
    assert growth < 4 * 40_000_000, f"{growth / 40e6:.2f} bytes a pixel"


def test_exif_orientation_is_applied():
    # 40x20 stored, EXIF 6 = rotate 90° clockwise to display: 20x40; red marks the stored top-left corner.
    stored = Image.new("RGB", (40, 20), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(stored, "PNG", exif=exif.tobytes())
    image, width, height = decode(data, NO_RESIZE)
    assert (width, height) == (20, 40)
    assert image.getpixel((15, 2)) == (255, 0, 0)  # top-left went to top-right
    assert image.getpixel((2, 2)) == (0, 0, 255)


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "BMP", "TIFF"])
def test_other_formats_decode(fmt):
    data = encode(Image.new("RGB", (8, 6), (0, 255, 0)), fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    rgb, size = pixel(data)
    assert size == (8, 6)
    assert rgb == (0, 255, 0)


@pytest.mark.parametrize(
    "size,expected",
    [
        ((500, 375), (1066, 800)),  # shorter side to 800, rounded down as torchvision does
        ((375, 500), (800, 1066)),
        ((4000, 50), (1333, 16)),  # longer side capped at 1333
        ((1, 1), (800, 800)),
        ((800, 600), (1066, 800)),
    ],
)
def test_model_input_size(size, expected):
    assert model_input_size(*size, min_size=800, max_size=1333) == expected


@pytest.mark.slow
def test_model_input_size_is_the_size_torchvision_resizes_to():
    """The model's own transform must find decoded images already at its size, or it would resize them again."""
    from torchvision.models.detection.transform import _resize_image_and_masks

    rng = np.random.default_rng(7)
    sizes = [(500, 375), (375, 500), (500, 333), (480, 360), (500, 281), (4032, 3024), (3024, 4032), (1333, 800)]
    sizes += [tuple(int(v) for v in rng.integers(40, 5000, 2)) for _ in range(200)]
    for width, height in sizes:
        for min_size, max_size in ((800, 1333), (320, 640)):
            resized, _ = _resize_image_and_masks(torch.zeros(1, height, width), min_size, max_size)
            assert model_input_size(width, height, min_size, max_size) == (resized.shape[2], resized.shape[1])


def test_large_jpeg_is_decoded_at_reduced_scale():
    """A 4000x3000 JPEG for a 320-px model: Pillow decodes it at 1/8 scale (500x375), then it is resized."""
    options = DecodeOptions(max_file_bytes=10**8, max_image_pixels=10**8, min_size=320, max_size=640)
    data = jpeg_bytes(4000, 3000, color=(10, 200, 30))
    from PIL.JpegImagePlugin import JpegImageFile

    drafted = []  # (size asked for, size decoded at), recorded around Pillow's own draft
    original_draft = JpegImageFile.draft

    def recording_draft(self, mode, size):
        result = original_draft(self, mode, size)
        drafted.append((size, self.size))
        return result

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(JpegImageFile, "draft", recording_draft)
        image, width, height = decode(data, options)
    assert drafted == [((426, 320), (500, 375))]
    assert (image.size, width, height) == ((426, 320), 4000, 3000)
    assert np.abs(np.asarray(image, dtype=int) - (10, 200, 30)).max() <= 3


def test_quarter_turned_jpeg_is_drafted_by_its_stored_size():
    """Stored 4000x2000 with EXIF orientation 6 (a quarter turn): the image is 2000x4000."""
    exif = Image.Exif()
    exif[0x0112] = 6
    options = DecodeOptions(max_file_bytes=10**8, max_image_pixels=10**8, min_size=320, max_size=640)
    image, width, height = decode(encoded(Image.new("RGB", (4000, 2000), (0, 0, 255)), "JPEG", exif=exif.tobytes()), options)
    assert (width, height) == (2000, 4000)
    assert image.size == (320, 640)


def test_resize_keeps_the_original_size():
    options = DecodeOptions(max_file_bytes=10**8, max_image_pixels=10**8, min_size=320, max_size=640)
    image, width, height = decode(jpeg_bytes(500, 375), options)
    assert image.size == (426, 320)
    assert (width, height) == (500, 375)


def batch_of(files: dict, tmp_path) -> pa.Table:
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    paths = [str(tmp_path / name) for name in files]
    return input_rows(paths, [len(files[name]) for name in files])


def test_each_bad_file_becomes_one_error_row(tmp_path):
    good = jpeg_bytes(30, 20)
    bomb = encode(Image.new("L", (3000, 2000)), "PNG")
    files = {
        "good.jpg": good,
        "empty.jpg": b"",
        "text.jpg": b"<html><body>not an image</body></html>",
        "truncated.jpg": good[: len(good) // 2],
        "random.jpg": b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4,
        "bomb.png": bomb,
    }
    limit = max(len(data) for data in files.values())
    files["huge.jpg"] = good + b"\0" * limit
    batch = batch_of(files, tmp_path)
    options = DecodeOptions(max_file_bytes=limit, max_image_pixels=5_000_000)
    out = decode_images(batch, filesystem=pafs.LocalFileSystem(), uri_prefix="", options=options)
    assert out.schema == DECODED_SCHEMA
    rows = {row["path"].rsplit("/", 1)[1]: row for row in out.to_pylist()}
    assert list(rows) == list(files)
    kinds = {name: row["error_kind"] for name, row in rows.items()}
    assert kinds == {
        "good.jpg": None,
        "empty.jpg": "empty_file",
        "text.jpg": "not_an_image",
        "truncated.jpg": "corrupt_image",
        "random.jpg": "not_an_image",
        "bomb.png": "too_many_pixels",
        "huge.jpg": "too_large",
    }
    assert rows["bomb.png"]["error"] == "3000x2000 is 6000000 pixels, over data.max_image_pixels=5000000"
    assert rows["huge.jpg"]["error"] == f"file is {len(good) + limit} bytes, over data.max_file_bytes={limit}"
    assert rows["good.jpg"]["error"] is None
    assert (rows["good.jpg"]["width"], rows["good.jpg"]["height"]) == (30, 20)
    assert len(rows["good.jpg"]["pixels"]) == 30 * 20 * 3
    assert all(row["pixels"] is None for name, row in rows.items() if name != "good.jpg")


# A minimal Encapsulated PostScript file: Pillow's EPS plugin opens it (and would hand it to Ghostscript).
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 6\n%%EndComments\nshowpage\n%%EOF\n"


def decoded_rows(files: dict, tmp_path, extensions) -> dict:
    """The decode stage's rows of these files, under the formats of these data.extensions, by name."""
    options = DecodeOptions(max_file_bytes=10**6, max_image_pixels=10**6, formats=image_formats(extensions))
    out = decode_images(batch_of(files, tmp_path), filesystem=pafs.LocalFileSystem(), uri_prefix="", options=options)
    return {row["path"].rsplit("/", 1)[1]: row for row in out.to_pylist()}


def test_only_the_formats_of_data_extensions_are_decoded(tmp_path):
    """A PCX and a PostScript file named .jpg are files Pillow would open (so no other reason refuses
    them); under the default data.extensions they are not images, never parsed by those decoders. A PNG
    named .jpg decodes: every configured extension's formats are allowed, not only the file's own."""
    pcx = encode(Image.new("RGB", (8, 6), (0, 255, 0)), "PCX")
    assert [Image.open(io.BytesIO(data)).format for data in (pcx, EPS)] == ["PCX", "EPS"]
    files = {"pcx.jpg": pcx, "eps.jpg": EPS, "png.jpg": encode(Image.new("RGB", (8, 6), (0, 255, 0)), "PNG")}
    rows = decoded_rows(files, tmp_path, compose_config().data.extensions)
    refused = "not an image of the formats data.extensions names (BMP, GIF, JPEG, PNG, TIFF, WEBP)"
    assert {name: (row["error_kind"], row["error"]) for name, row in rows.items()} == {
        "pcx.jpg": ("not_an_image", refused), "eps.jpg": ("not_an_image", refused), "png.jpg": (None, None)}
    assert (rows["png.jpg"]["width"], rows["png.jpg"]["height"]) == (8, 6)
    assert np.frombuffer(rows["png.jpg"]["pixels"], np.uint8).reshape(6, 8, 3)[0, 0].tolist() == [0, 255, 0]


def test_the_formats_follow_data_extensions(tmp_path):
    """data.extensions=[jpg]: a PNG named .jpg is refused too; [jpg, pcx]: the PCX decodes."""
    files = {"png.jpg": encode(Image.new("RGB", (8, 6)), "PNG"), "pcx.jpg": encode(Image.new("RGB", (8, 6)), "PCX")}
    (tmp_path / "jpg").mkdir()
    rows = decoded_rows(files, tmp_path / "jpg", ["jpg"])
    assert [(row["error_kind"], row["error"]) for row in rows.values()] == [
        ("not_an_image", "not an image of the formats data.extensions names (JPEG)")] * 2
    rows = decoded_rows(files, tmp_path, ["JPG", ".pcx"])
    assert [row["error_kind"] for row in rows.values()] == ["not_an_image", None]
    assert image_formats(["jpg", "jpeg", "JPEG", "tif", "tiff"]) == ("JPEG", "TIFF")


def test_a_file_storage_does_not_find_is_a_refused_row_for_the_driver_to_judge(tmp_path):
    """Not found is the file's own fault or the whole run's (a deleted bucket): the driver tells which
    (tests/test_verdicts.py) and commits it as unreadable or stops the run."""
    batch = input_rows([str(tmp_path / "gone.jpg")], [10])
    out = decode_images(batch, filesystem=pafs.LocalFileSystem(), uri_prefix="", options=NO_RESIZE)
    row = out.to_pylist()[0]
    assert row["error_kind"] == "refused"
    assert "gone.jpg" in row["error"]


def test_uri_prefix_makes_user_facing_paths(tmp_path):
    batch = batch_of({"a.jpg": jpeg_bytes()}, tmp_path)
    out = decode_images(batch, filesystem=pafs.LocalFileSystem(), uri_prefix="s3://", options=NO_RESIZE)
    assert out.column("path").to_pylist() == ["s3://" + str(tmp_path / "a.jpg")]


def test_a_file_of_unknown_size_is_read_no_further_than_the_limit(tmp_path):
    """Rows from a manifest without sizes: the limit is checked on the bytes read, and no more are read."""
    (tmp_path / "big.jpg").write_bytes(jpeg_bytes() + b"\0" * 5000)
    (tmp_path / "small.jpg").write_bytes(jpeg_bytes())
    batch = input_rows([str(tmp_path / "big.jpg"), str(tmp_path / "small.jpg")], [None, None])
    options = DecodeOptions(max_file_bytes=4000, max_image_pixels=1_000_000)
    rows = decode_images(batch, filesystem=pafs.LocalFileSystem(), uri_prefix="", options=options).to_pylist()
    assert [(row["error_kind"], row["error"]) for row in rows] == [("too_large", "file is over data.max_file_bytes=4000 bytes"), (None, None)]
