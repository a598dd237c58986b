"""Images and input trees the tests write: gradients, every kind of bad file, odd directory entries."""

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image


def jpeg_bytes(width=64, height=48, color=(200, 40, 40), **save_args) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format="JPEG", **save_args)
    return buffer.getvalue()


def gradient_jpeg(width: int, height: int, number: int) -> bytes:
    """A JPEG of a gradient with a bright square, its green level set by `number`."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[..., 0] = np.linspace(0, 255, width, dtype=np.uint8)
    pixels[..., 1] = (number * 37) % 256
    pixels[height // 4 : height // 2, width // 4 : width // 2] = 255
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def write_images(folder: Path, count: int, width=96, height=72) -> list[Path]:
    """`count` distinct JPEGs (gradient_jpeg), named img_000.jpg..."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"img_{i:03d}.jpg" for i in range(count)]
    for i, path in enumerate(paths):
        path.write_bytes(gradient_jpeg(width, height, i))
    return paths


def encoded(image: Image.Image, fmt: str, **save_args) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save_args)
    return buffer.getvalue()


def write_mixed_inputs(folder: Path) -> dict[str, object]:
    """Every kind of bad file and every odd-but-decodable image; returns name -> expected error kind
    (None for success). Limits to pass: data.max_file_bytes=200000, data.max_image_pixels=4000000."""
    folder.mkdir(parents=True, exist_ok=True)
    good = jpeg_bytes(40, 30)
    rotated = Image.new("RGB", (40, 20), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6
    frames = [Image.new("P", (16, 16), i) for i in range(3)]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:])
    palette = Image.new("P", (20, 20))
    palette.putpalette([i % 256 for i in range(768)])
    files = {
        # bad: one error row each
        "empty.jpg": (b"", "empty_file"),
        "truncated.jpg": (good[: len(good) // 2], "corrupt_image"),
        "page.jpg": (b"<!doctype html><html><body>404</body></html>", "not_an_image"),
        "noise.jpg": (b"\xff\xd8\xff\xe0" + np.random.default_rng(1).bytes(3000), "corrupt_image"),
        "document.png": (b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n", "not_an_image"),
        "bomb.png": (encoded(Image.new("1", (3000, 3000)), "PNG"), "too_many_pixels"),
        "huge.bmp": (encoded(Image.new("RGB", (300, 300)), "BMP"), "too_large"),
        # odd but decodable
        "gray.png": (encoded(Image.new("L", (20, 10), 100), "PNG"), None),
        "palette.png": (encoded(palette, "PNG"), None),
        "alpha.png": (encoded(Image.new("RGBA", (20, 10), (1, 2, 3, 4)), "PNG"), None),
        "gray_alpha.png": (encoded(Image.new("LA", (20, 10), (9, 9)), "PNG"), None),
        "cmyk.tif": (encoded(Image.new("CMYK", (20, 10), (0, 50, 100, 0)), "TIFF"), None),
        "deep.png": (encoded(Image.fromarray(np.full((10, 20), 40000, np.uint16)), "PNG"), None),
        "dot.png": (encoded(Image.new("RGB", (1, 1), (255, 0, 0)), "PNG"), None),
        "strip.jpg": (jpeg_bytes(4000, 50), None),
        "rotated.jpg": (encoded(rotated, "JPEG", exif=exif.tobytes()), None),
        "animated.gif": (gif.getvalue(), None),
        "photo.webp": (encoded(Image.new("RGB", (20, 10), (5, 5, 5)), "WEBP"), None),
        "scan.tiff": (encoded(Image.new("RGB", (20, 10)), "TIFF"), None),
        "UPPER.JPG": (good, None),
    }
    for name, (data, _) in files.items():
        (folder / name).write_bytes(data)
    (folder / "readme.txt").write_text("not an image extension: ignored")
    return {name: kind for name, (_, kind) in files.items()}


def odd_tree(root):
    """One of each entry issue 16 names, beside one good image."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "good.jpg").write_bytes(b"good")
    (root / os.fsdecode(b"bad\xffutf8.jpg")).write_bytes(b"odd name")
    (root / "100%.jpg").write_bytes(b"percent")
    (root / "sub").mkdir()
    (root / "sub" / "inner.png").write_bytes(b"inner")
    (root / "sub" / "sub_parent").symlink_to("..")  # a link to the parent folder: not followed twice
    (root / "loop.jpg").symlink_to("loop.jpg")  # a link to itself
    (root / "dangling.jpg").symlink_to("nowhere.jpg")
    os.mkfifo(root / "pipe.jpg")
    (root / "dir.jpg").mkdir()
    (root / "dir.jpg" / "in_dir.jpg").write_bytes(b"in dir")
