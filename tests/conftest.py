"""Shared fixtures: composed configs, generated images, local Ray instances and clusters."""

import contextlib
import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app.config import compose_config  # noqa: F401  (the tests import it from here)

# Keep Ray quiet and light in tests: no dashboard, no usage stats, small object store.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.pop("RAY_ADDRESS", None)

# The tests' model: the light one, random init (seeded: the same weights in every process). At the default
# score threshold it detects nothing; at threshold 0 every image gets model.max_detections boxes, which
# differ from image to image (their scores and labels do not: random weights score every box alike).
FAST_MODEL = ["model=fasterrcnn_mobilenet_v3_large_320_fpn", "model.weights=none", "model.score_threshold=0",
              "model.max_detections=3"]


def jpeg_bytes(width=64, height=48, color=(200, 40, 40), **save_args) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format="JPEG", **save_args)
    return buffer.getvalue()


def write_images(folder: Path, count: int, width=96, height=72) -> list[Path]:
    """`count` distinct JPEGs of a gradient with a bright square, named img_000.jpg..."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        pixels = np.zeros((height, width, 3), np.uint8)
        pixels[..., 0] = np.linspace(0, 255, width, dtype=np.uint8)
        pixels[..., 1] = (i * 37) % 256
        pixels[height // 4 : height // 2, width // 4 : width // 2] = 255
        path = folder / f"img_{i:03d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(path)
    return paths


@contextlib.contextmanager
def connected_cluster(head_cpus: int, *workers: dict):
    """A real multi-node Ray cluster on this machine (ray.cluster_utils.Cluster), with this process
    connected as its driver; yields the cluster and its worker nodes. The head runs the dashboard, for
    the state API (where tasks and actors ran)."""
    import ray
    from ray.cluster_utils import Cluster

    store = 200 * 1024**2
    cluster = Cluster(initialize_head=True, head_node_args=dict(num_cpus=head_cpus, include_dashboard=True, object_store_memory=store))
    nodes = [cluster.add_node(object_store_memory=store, **resources) for resources in workers]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        yield cluster, nodes
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray instance with a fixed CPU count, shared by one test module's pipelines (modules that
    start their own multi-node cluster need Ray free)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=300 * 1024**2)
    yield ray
    ray.shutdown()


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


def model_detections(cfg, paths) -> dict[str, dict]:
    """What the configured model detects in each image, computed here, one image at a time, on the pixels
    the job decodes: boxes mapped to original pixels, scores, labels and label names, by path. One torch
    thread, as in a detector actor on a 2-core node, so that the floats are the actor's."""
    import torch

    from app.decode import DecodeOptions, decode
    from app.detector import PixelModel
    from app.model import build_model
    from app.pipeline import model_spec

    options = DecodeOptions(cfg.data.max_file_bytes, cfg.data.max_image_pixels, cfg.model.min_size, cfg.model.max_size)
    model, names = build_model(model_spec(cfg))
    model = PixelModel(model)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    found = {}
    try:
        for path in paths:
            image, width, height = decode(Path(path).read_bytes(), options)
            pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)
            with torch.inference_mode():
                output = model([pixels])[0]
            scale = torch.tensor([width / image.width, height / image.height] * 2, dtype=torch.float32)
            found[str(path)] = {
                "boxes": (output["boxes"] * scale).tolist(),
                "scores": output["scores"].tolist(),
                "labels": output["labels"].tolist(),
                "label_names": [names[label] for label in output["labels"].tolist()],
            }
    finally:
        torch.set_num_threads(threads)
    return found


def assert_detections(rows: dict[str, dict], expected: dict[str, dict]) -> None:
    """Each row (by path) holds the expected detections: boxes within 0.01 px (float32 arithmetic in
    another order), scores within 1e-6, labels and names exactly; at least one detection each."""
    assert sorted(rows) == sorted(expected)
    for path, want in expected.items():
        row = rows[path]
        assert row["num_detections"] == len(want["labels"]) > 0, path
        assert (row["labels"], row["label_names"]) == (want["labels"], want["label_names"]), path
        assert np.allclose(row["scores"], want["scores"], rtol=0, atol=1e-6), path
        assert np.allclose(row["boxes"], want["boxes"], rtol=0, atol=0.01), (path, row["boxes"], want["boxes"])
