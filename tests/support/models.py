"""The tests' model (a seeded, calibrated checkpoint of the light model) and the detections it makes,
computed one image at a time outside the job, for tests to compare the job's rows with."""

import copy
import functools
import hashlib
import inspect
import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from app.config import VIDEO_EXTENSIONS

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
# The tests' runs: the light model, and no video files. Inputs that Ray tasks list (a manifest, a large
# tree) flow as two streams when videos are read, images' and videos', each listing them (app.inputs): a
# few seconds more a run, which the image tests leave out; the video tests add VIDEOS.
FAST_MODEL = [f"model={LIGHT}", f"model.weights={LIGHT_CHECKPOINT}", "model.score_threshold=0", "model.max_detections=3",
              "inference.num_actors=1", "data.video.extensions=[]"]
VIDEOS = [f"data.video.extensions=[{','.join(VIDEO_EXTENSIONS)}]"]


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
