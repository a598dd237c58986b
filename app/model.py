"""Detection models by torchvision name, and the weights they load.

Weights are resolved on the driver before any work starts, so a run that cannot get its weights stops
with one clear paragraph instead of failing inside every actor. torch and torchvision are imported by the
functions that use them: the driver of a run with a checkpoint or random weights never loads them (about
3 s and 600 MB), only the driver that checks torchvision's pretrained weights and the detector actors do.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import io
import os
import time
import types
import warnings
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Optional

from app import storage

if TYPE_CHECKING:
    import torch

MODEL_NAMES = (
    "fasterrcnn_resnet50_fpn_v2",
    "fasterrcnn_resnet50_fpn",
    "fasterrcnn_mobilenet_v3_large_fpn",
    "fasterrcnn_mobilenet_v3_large_320_fpn",
)
PRETRAINED = "DEFAULT"
RANDOM_INIT = "none"
# Random initial weights are drawn from this seed, so that every actor of a run holds the same model.
RANDOM_INIT_SEED = 0
# Begins the message of a WeightsError raised in a detector actor, so that the driver (app.commit) finds it
# inside Ray's wrapping of the actor's error and stops the run with it.
WEIGHTS_ERROR_MARKER = "ray-detect weights error:"


class WeightsError(Exception):
    """The configured weights cannot be obtained."""


@dataclass(frozen=True)
class ModelSpec:
    """Everything an actor needs to build the model, resolved on the driver."""

    name: str
    weights: str  # PRETRAINED, RANDOM_INIT or a checkpoint path/URI
    score_threshold: float
    min_size: int
    max_size: int
    max_detections: int = 100
    num_classes: Optional[int] = None
    class_names: Optional[tuple[str, ...]] = None
    # Why the weights differ from what was asked for (the demo's random-init fallback), else None.
    fallback_reason: Optional[str] = None
    # A checkpoint's SHA-256 (hex): model.checkpoint_sha256 until resolve_weights, then the digest of the
    # bytes the driver read, which every actor checks the bytes it reads against.
    weights_sha256: Optional[str] = None


def coco_categories(name: str) -> list[str]:
    """Label names of torchvision's pretrained weights for this model (index = label id)."""
    from torchvision.models import get_model_weights

    return list(get_model_weights(name).DEFAULT.meta["categories"])


def pretrained_weights_file(name: str) -> str:
    import torch
    from torchvision.models import get_model_weights

    url = get_model_weights(name).DEFAULT.url
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))


def published_sha256_prefix(url: str) -> str:
    """The start of a weights file's SHA-256 that torchvision publishes in its name (torch.hub's
    convention: name-<hex digits>.pth)."""
    import torch

    match = torch.hub.HASH_REGEX.search(os.path.basename(url))
    if not match:
        raise ValueError(f"{url} carries no SHA-256 in its name")
    return match.group(1)


def matches_published_hash(path: str, url: str) -> bool:
    """Whether the file at `path` is the one torchvision published at `url`, by its SHA-256."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest().startswith(published_sha256_prefix(url))


def baked_weights_problem(names: list[str]) -> Optional[str]:
    """What is wrong with the pretrained weights of these models in TORCH_HOME, for the image's build to
    stop on (None: each is there and is the file torchvision published)."""
    from torchvision.models import get_model_weights

    missing = [name for name in names if not os.path.isfile(pretrained_weights_file(name))]
    if missing:
        return f"ray-detect image: weights missing from TORCH_HOME for: {' '.join(missing)}"
    altered = [name for name in names if not matches_published_hash(pretrained_weights_file(name), get_model_weights(name).DEFAULT.url)]
    if altered:
        return f"ray-detect image: weights in TORCH_HOME differ from torchvision's published SHA-256 for: {' '.join(altered)}"
    return None


def ensure_pretrained_weights(name: str, url: Optional[str] = None) -> None:
    """Make sure torchvision's pretrained weights are in TORCH_HOME, downloading them from `url` (default:
    where torchvision publishes them) if they are not. Either way their SHA-256 is checked against the one
    published in the file's name: torch.hub checks a download, this function a file already there (which
    torchvision would load unchecked)."""
    import torch
    from torchvision.models import get_model_weights

    target = pretrained_weights_file(name)
    url = url or get_model_weights(name).DEFAULT.url
    if os.path.exists(target):
        if not matches_published_hash(target, url):
            raise WeightsError(
                f"model.weights=DEFAULT: {target} is not torchvision's {os.path.basename(url)}: its SHA-256 does not "
                f"start with {published_sha256_prefix(url)}, as the name says; delete it (it is downloaded again) or "
                f"replace it with the published file")
        return
    os.makedirs(os.path.dirname(target), exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, target, hash_prefix=published_sha256_prefix(url), progress=False)
    except Exception as error:  # URLError, HTTPError, timeouts, disk errors: all mean "not available"
        raise WeightsError(
            f"model.weights=DEFAULT needs torchvision's pretrained weights for {name}, which are not in "
            f"TORCH_HOME ({torch.hub.get_dir()}) and could not be downloaded from {url} "
            f"({type(error).__name__}: {error}). Fix it in one of three ways: point model.weights at a "
            f"checkpoint file (local path or URI); pre-fill TORCH_HOME with {os.path.basename(url)} under "
            f"hub/checkpoints/ (the Docker image does this at build time); or pass model.weights=none for "
            f"random initialisation, whose detections are meaningless."
        ) from error


def resolve_weights(spec: ModelSpec, allow_random_fallback: bool = False) -> ModelSpec:
    """Check the weights can be had before work starts; normalise the weights keyword."""
    if spec.weights.lower() in (RANDOM_INIT, "null", ""):
        return replace(spec, weights=RANDOM_INIT)
    if spec.weights.upper() == PRETRAINED:
        try:
            ensure_pretrained_weights(spec.name)
        except WeightsError as error:
            if not allow_random_fallback:
                raise
            return replace(spec, weights=RANDOM_INIT, fallback_reason=str(error))
        return replace(spec, weights=PRETRAINED)
    location = storage.resolve(spec.weights)
    try:
        found = location.filesystem.get_file_info(location.path).type == storage.pafs.FileType.File
        digest = file_sha256(location) if found else None
    except OSError as error:
        raise WeightsError(f"model.weights checkpoint {spec.weights} cannot be reached: {error}") from error
    if not found:
        raise WeightsError(f"model.weights checkpoint {spec.weights} does not exist")
    if spec.weights_sha256 is not None and digest != spec.weights_sha256.lower():
        raise WeightsError(f"model.weights checkpoint {spec.weights} has the SHA-256 {digest}, not "
                           f"model.checkpoint_sha256={spec.weights_sha256}")
    return replace(spec, weights_sha256=digest)


def file_sha256(location: storage.Location) -> str:
    """The SHA-256 (hex) of a file, read in chunks: a checkpoint is hundreds of MB."""
    digest = hashlib.sha256()
    with location.filesystem.open_input_stream(location.path) as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_checkpoint(uri: str, sha256: Optional[str] = None) -> dict:
    """The dict a checkpoint file holds: a bare state dict, or a dict holding one under "model" or
    "state_dict" (torchvision's reference scripts save the former), optionally with "class_names";
    build_model takes the state dict out. With `sha256`, bytes of another digest are refused (a
    WeightsError marked for the driver) before torch parses them."""
    import torch

    location = storage.resolve(uri)
    with location.filesystem.open_input_stream(location.path) as stream:
        data = stream.read()
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise WeightsError(
            f"{WEIGHTS_ERROR_MARKER} model.weights checkpoint {uri} read by a detector actor has the SHA-256 "
            f"{hashlib.sha256(data).hexdigest()}, not {sha256} (the digest the run checked before work): it changed "
            "since, or this node reads other bytes at that path")
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def build_model(spec: ModelSpec, seconds: Optional[dict[str, float]] = None) -> tuple[torch.nn.Module, list[str]]:
    """The model in eval mode, on CPU, and its label names (index = label id).

    A model whose weights are loaded (torchvision's pretrained ones or a checkpoint) is built on torch's
    meta device, where layers have shapes but no memory and no random initialisation, and the weights are
    then assigned to it: random initialisation that the weights would overwrite costs seconds on a CPU
    (about 2 s for resnet50 FPN v2 on this project's machines). With model.weights=none the random
    initialisation is the weights, drawn from RANDOM_INIT_SEED. `seconds`, when given, receives the seconds
    spent building ("model build") and reading and loading the weights ("weights load")."""
    import torch
    from torchvision.models import get_model

    seconds = {} if seconds is None else seconds
    started = time.perf_counter()
    options = dict(box_score_thresh=spec.score_threshold, box_detections_per_img=spec.max_detections,
                   min_size=spec.min_size, max_size=spec.max_size)
    if spec.weights == PRETRAINED:
        # torchvision's builder reads the weights into the meta model, which keeps none of them (torch warns
        # of it, for each tensor); they are read again (from TORCH_HOME, so from the page cache) and assigned.
        with torch.device("meta"), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter in the checkpoint to a meta parameter")
            model = get_model(spec.name, weights=PRETRAINED, **options)
        seconds["model build"] = time.perf_counter() - started
        started = time.perf_counter()
        assign_weights(model, torch.load(pretrained_weights_file(spec.name), map_location="cpu", weights_only=True))
        seconds["weights load"] = time.perf_counter() - started
        return model.eval(), coco_categories(spec.name)
    state_dict, class_names = None, spec.class_names
    if spec.weights != RANDOM_INIT:
        checkpoint = load_checkpoint(spec.weights, spec.weights_sha256)
        state_dict = checkpoint.get("model") or checkpoint.get("state_dict") or checkpoint
        class_names = class_names or checkpoint.get("class_names")
    read = time.perf_counter() - started
    started = time.perf_counter()
    num_classes = spec.num_classes or (len(class_names) if class_names else None)
    if num_classes is None and state_dict is not None:
        num_classes = state_dict["roi_heads.box_predictor.cls_score.weight"].shape[0]
    num_classes = num_classes or len(coco_categories(spec.name))
    if state_dict is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            model = get_model(spec.name, weights=None, weights_backbone=None, num_classes=num_classes, **options)
        seconds["model build"] = time.perf_counter() - started
    else:
        with torch.device("meta"):
            model = get_model(spec.name, weights=None, weights_backbone=None, num_classes=num_classes, **options)
        seconds["model build"] = time.perf_counter() - started
        started = time.perf_counter()
        assign_weights(model, state_dict)
    seconds["weights load"] = read + (time.perf_counter() - started if state_dict is not None else 0.0)
    if class_names is None:
        coco = coco_categories(spec.name)
        class_names = coco if num_classes == len(coco) else [f"class_{i}" for i in range(num_classes)]
    if len(class_names) != num_classes:
        raise WeightsError(f"{len(class_names)} class names given for a model with {num_classes} classes")
    return model.eval(), list(class_names)


def assign_weights(model: torch.nn.Module, state_dict: dict) -> None:
    """Give a model built on the meta device the tensors of a state dict, each in its layer's dtype (as
    load_state_dict copies them into an initialised model): every parameter and buffer, FrozenBatchNorm's
    and BatchNorm's statistics included, must be in it (strict), and none may be left on the meta device."""
    expected = model.state_dict()
    converted = {key: value.to(expected[key].dtype) if key in expected and value.is_floating_point() else value
                 for key, value in state_dict.items()}
    model.load_state_dict(converted, strict=True, assign=True)
    left = [name for name, tensor in (*model.named_parameters(), *model.named_buffers()) if tensor.is_meta]
    if left:
        raise WeightsError(f"model.weights leave {len(left)} tensors of {type(model).__name__} without values: {', '.join(left[:5])}")


def torch_build() -> types.ModuleType:
    """The installed torch's torch/version.py (its __version__ and the CUDA it was built for, `cuda`), loaded
    alone, for the manifest: importing torch would cost the driver seconds and hundreds of MB that only the
    actors need."""
    path = importlib.metadata.distribution("torch").locate_file("torch/version.py")
    spec = importlib.util.spec_from_file_location("ray_detect_torch_build", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
