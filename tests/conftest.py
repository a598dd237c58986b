"""Shared fixtures: composed configs, generated images, and one local Ray instance per session."""

import io
import os
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_module
from PIL import Image

# Keep Ray quiet and light in tests: no dashboard, no usage stats, small object store.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.pop("RAY_ADDRESS", None)

FAST_MODEL = ["model=fasterrcnn_mobilenet_v3_large_320_fpn", "model.weights=none"]


def compose_config(overrides=()):
    with initialize_config_module(config_module="app.conf", version_base=None):
        return compose(config_name="config", overrides=list(overrides))


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


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray instance with a fixed CPU count, shared by one test module's pipelines (modules that
    start their own multi-node cluster need Ray free)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=300 * 1024**2)
    yield ray
    ray.shutdown()
