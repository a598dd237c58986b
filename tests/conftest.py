"""Shared fixtures: composed configs, generated images, local Ray instances and clusters."""

import contextlib
import copy
import functools
import hashlib
import inspect
import io
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app.config import compose_config  # noqa: F401  (the tests import it from here)

# Keep Ray quiet and light in tests: no dashboard, no usage stats, small object store.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.pop("RAY_ADDRESS", None)

# The tests' model: the light one, from a checkpoint made once per machine (light_checkpoint, in a file
# named by checkpoint_key, a digest of what makes it): every image gets model.max_detections boxes (score
# threshold 0), with scores and boxes that depend on the image.
# One detector actor: a run's start is mostly its actors' start (a process importing torch and torchvision),
# and two of them on this machine's two cores start about 2 s later than one. The tests of how many
# actors a run starts, where, and how they share the work override it (inference.num_actors=auto).
LIGHT = "fasterrcnn_mobilenet_v3_large_320_fpn"


def light_checkpoint() -> Path:
    """The tests' model weights: the light model's seeded random init, with its BatchNorm statistics
    measured on the bundled photos (one pass of the backbone in training mode, as training would set
    them). Random init alone does not detect by image: with BatchNorm's initial statistics the backbone's
    activations shrink to about 1e-9, every box of every image scores alike, and which boxes are kept is
    a matter of ties. Written once, atomically, where every test process (and Ray worker) finds it."""
    if LIGHT_CHECKPOINT.exists():
        return LIGHT_CHECKPOINT
    import torch

    from app.config import SAMPLES_DIR
    from app.model import ModelSpec, build_model

    model, _ = build_model(ModelSpec(name=LIGHT, weights="none", score_threshold=0.0, min_size=320, max_size=640))
    photos = [Image.open(path).convert("RGB").resize((426, 320)) for path in sorted(SAMPLES_DIR.glob("*.jpg"))]
    batch, _ = model.transform([torch.from_numpy(np.array(photo)).permute(2, 0, 1).float().div(255) for photo in photos])
    for module in model.backbone.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # the running statistics become those of the one pass below
    with torch.no_grad():
        model.backbone.train()(batch.tensors)
    LIGHT_CHECKPOINT.parent.mkdir(parents=True, exist_ok=True)
    partial = LIGHT_CHECKPOINT.with_suffix(f".{os.getpid()}.part")
    torch.save({"model": model.eval().state_dict()}, partial)
    partial.replace(LIGHT_CHECKPOINT)
    return LIGHT_CHECKPOINT


def checkpoint_key() -> str:
    """A digest of what makes the tests' checkpoint: light_checkpoint's code, the model's name, the
    photos it calibrates on, and the torch and torchvision that build it. A change to any of them makes
    a new file, where a fixed name would reuse a stale one."""
    from importlib.metadata import version

    from app.config import SAMPLES_DIR

    digest = hashlib.sha256(inspect.getsource(light_checkpoint).encode() + LIGHT.encode())
    for path in sorted(SAMPLES_DIR.glob("*.jpg")):
        digest.update(path.read_bytes())
    for package in ("torch", "torchvision"):
        digest.update(version(package).encode())
    return digest.hexdigest()[:16]


LIGHT_CHECKPOINT = Path(tempfile.gettempdir()) / "ray-detect-tests" / f"light-calibrated-{checkpoint_key()}.pt"
FAST_MODEL = [f"model={LIGHT}", f"model.weights={LIGHT_CHECKPOINT}", "model.score_threshold=0", "model.max_detections=3",
              "inference.num_actors=1"]




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


# The modules with a test that uses local_ray: they run first, one after another, on one Ray instance.
LOCAL_RAY_MODULES: set[str] = set()


def pytest_collection_modifyitems(config, items):
    """The modules that use local_ray first (otherwise in their order), so that one Ray instance serves
    them all; tests marked cuda skip where torch cannot use a GPU (scripts/gpu-check.sh runs them there)."""
    import torch

    LOCAL_RAY_MODULES.update(item.module.__name__ for item in items if "local_ray" in item.fixturenames)
    items.sort(key=lambda item: item.module.__name__ not in LOCAL_RAY_MODULES)
    if torch.cuda.is_available():
        return
    for item in items:
        if item.get_closest_marker("cuda"):
            item.add_marker(pytest.mark.skip(reason="needs CUDA: torch cannot use a GPU here"))


@pytest.fixture(scope="session", autouse=True)
def tests_model():
    """FAST_MODEL's checkpoint exists before any test uses it."""
    return light_checkpoint()


@pytest.fixture
def local_ray():
    """A local Ray instance with a fixed CPU count, started by the first test that asks for it and shared
    by the modules of LOCAL_RAY_MODULES (starting Ray takes seconds). ray_free_for_other_modules shuts it
    down before the first module that starts Ray its own way (a multi-node cluster, a Ray with other
    settings or environment)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=300 * 1024**2)
    return ray


@pytest.fixture(scope="module", autouse=True)
def ray_free_for_other_modules(request):
    """No Ray instance of the tests' own up when a module outside LOCAL_RAY_MODULES starts."""
    import ray

    if request.module.__name__ not in LOCAL_RAY_MODULES and ray.is_initialized():
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


def model_detections(cfg, paths, read_bytes=lambda path: Path(path).read_bytes()) -> dict[str, dict]:
    """What the configured model detects in each image, computed here, one image at a time, on the pixels
    the job decodes (at model size, or as they are with inference.resize_on_cpu=false, for the model to
    resize): boxes mapped to original pixels, scores, labels and label names, by path."""
    from app.decode import DecodeOptions
    from app.pipeline import model_spec

    resize = cfg.inference.resize_on_cpu
    options = DecodeOptions(cfg.data.max_file_bytes, cfg.data.max_image_pixels, cfg.model.min_size if resize else None,
                            cfg.model.max_size if resize else None)
    spec = model_spec(cfg)
    return {str(path): copy.deepcopy(image_detections(spec, options, read_bytes(path))) for path in paths}


@functools.lru_cache(maxsize=None)
def reference_model(spec):
    """The model of `spec` as the detector runs it, and its label names; built once per spec."""
    from app.detector import PixelModel
    from app.model import build_model

    model, names = build_model(spec)
    return PixelModel(model), names


@functools.lru_cache(maxsize=None)
def image_detections(spec, options, data: bytes) -> dict:
    """model_detections of one image's bytes, remembered: the tests' images repeat from test to test, and
    the model, the decoding and the bytes (all in the key) make the detections. One torch thread, as in a
    detector actor on a 2-core node, so that the floats are the actor's."""
    import torch

    from app.decode import decode

    model, names = reference_model(spec)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        image, width, height = decode(data, options)
        pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)
        with torch.inference_mode():
            output = model([pixels])[0]
    finally:
        torch.set_num_threads(threads)
    scale = torch.tensor([width / image.width, height / image.height] * 2, dtype=torch.float32)
    return {
        "boxes": (output["boxes"] * scale).tolist(),
        "scores": output["scores"].tolist(),
        "labels": output["labels"].tolist(),
        "label_names": [names[label] for label in output["labels"].tolist()],
    }


def assert_detections(rows: dict[str, dict], expected: dict[str, dict]) -> None:
    """Each row (by path) holds the expected detections, at least one: the same number, and for each a
    detection of the same label and name, its score within 1e-6 and its box within 0.01 px. Matched,
    not compared in order: floats summed in another order (a batch, another thread count) may swap two
    detections whose scores differ by less than that."""
    assert sorted(rows) == sorted(expected)
    for path, want in expected.items():
        row = rows[path]
        assert row["num_detections"] == len(want["labels"]) > 0, path
        found = list(zip(row["labels"], row["label_names"], row["scores"], row["boxes"]))
        for detection in zip(want["labels"], want["label_names"], want["scores"], want["boxes"]):
            match = next((i for i, other in enumerate(found) if other[:2] == detection[:2]
                          and abs(other[2] - detection[2]) <= 1e-6 and np.allclose(other[3], detection[3], rtol=0, atol=0.01)), None)
            assert match is not None, (path, detection, found)
            found.pop(match)


_exit_status = 0


def pytest_sessionfinish(session, exitstatus):
    global _exit_status
    _exit_status = int(exitstatus)
    import ray

    ray.shutdown()  # local_ray's, when the last module used it


def pytest_unconfigure(config):
    """Leave at once once pytest has reported: the interpreter's own teardown, with Ray's and its metrics'
    native threads still around after the last `ray.shutdown()`, once ended in a segmentation fault after
    every test had run (exit code 139 instead of pytest's)."""
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_exit_status)
