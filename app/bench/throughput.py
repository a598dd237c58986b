"""The benchmark's throughput suite (`ray-detect bench throughput`). For each model, on the same generated
JPEGs (a Pascal-VOC-like mix of sizes and orientations) and the same model settings, in these modes:
  model       the model alone: images decoded and resized beforehand, pinned, batches in file
              order (not grouped by shape); copy in, forward, outputs out (GPU default);
  bare@N      decode + forward in a plain loop in this process at batch size N, torch on every
              core; the best N stands for "bare" (CPU default, at batch sizes 1, 2 and 4);
  dataloader  a PyTorch DataLoader whose worker processes decode, the model in this process
              (GPU default);
  tutorial    Ray's tutorial pattern: read_images -> map(ToTensor + weights.transforms())
              -> map_batches(model class) on one actor (one GPU where there is one);
  app         app.pipeline.run() end to end with its defaults on a local Ray.
Each runs at two input counts; the marginal rate (extra images / extra seconds) cancels
the fixed start-up cost (Ray, actors, model build), which is reported on its own along
with the time to the first result. --precisions fp32 fp16 repeats it all in half precision.
"""

import functools
import os
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import ray
import torch

from app import pipeline
from app.bench.harness import (
    DEVICE,
    Run,
    input_folder,
    load_model,
    marginal,
    model_batch_size,
    model_overrides,
    number,
    read_rgb,
    run_app,
    timed,
)
from app.config import compose_config
from app.decode import DecodeOptions, decode
from app.model import ModelSpec, build_model


MODELS = ("fasterrcnn_mobilenet_v3_large_320_fpn", "fasterrcnn_resnet50_fpn_v2")


# Input counts per model and device for the throughput runs (the smaller, the larger): the heavy model is
# ~100x slower on a CPU, and a GPU runs either 50-500x faster than a CPU does.
DEFAULT_COUNTS = {
    "cpu": {"fasterrcnn_mobilenet_v3_large_320_fpn": (40, 200), "fasterrcnn_resnet50_fpn_v2": (8, 16)},
    "cuda": {"fasterrcnn_mobilenet_v3_large_320_fpn": (500, 2500), "fasterrcnn_resnet50_fpn_v2": (200, 1000)},
}


# Modes, in the order they run: on a CPU the bare loop stands for "what people write"; on a GPU also
# the model alone and a DataLoader loop.
CPU_MODES = ("bare", "tutorial", "app")
GPU_MODES = ("model", "dataloader", "tutorial", "app")
MODES = ("model", "bare", "dataloader", "tutorial", "app")


def run_model(folder: Path, cfg, out: Path, batch_size: int) -> Run:
    """The model alone: images decoded and resized to the model's size beforehand, in pinned memory;
    batches in file order (not grouped by shape), copied to the device, outputs copied back."""
    model = load_model(cfg)
    options = DecodeOptions(10**9, 10**9, cfg.model.min_size, cfg.model.max_size)
    images = [torch.from_numpy(np.array(decode(path.read_bytes(), options)[0])).permute(2, 0, 1) for path in sorted(folder.iterdir())]
    if DEVICE.type == "cuda":
        images = [image.contiguous().pin_memory() for image in images]
    started, detections, first = time.monotonic(), 0, None
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            inputs = [image.to(DEVICE, non_blocking=True).float().mul_(1 / 255) for image in images[start : start + batch_size]]
            outputs = [{key: value.cpu() for key, value in output.items()} for output in model(inputs)]
            detections += sum(len(output["labels"]) for output in outputs)
            first = first if first is not None else time.monotonic() - started
    return Run(detections, first, time.monotonic() - started)


def run_bare(folder: Path, cfg, out: Path, batch_size: int) -> Run:
    """Decode and forward in one loop in this process, torch threads = every core."""
    started = time.monotonic()
    model = load_model(cfg)
    paths = sorted(folder.iterdir())
    detections, first = 0, None
    with torch.inference_mode():
        for start in range(0, len(paths), batch_size):
            tensors = [torch.from_numpy(read_rgb(path)).to(DEVICE).permute(2, 0, 1).float().div_(255.0) for path in paths[start : start + batch_size]]
            outputs = model(tensors)
            detections += sum(len(output["labels"].cpu()) for output in outputs)
            first = first if first is not None else time.monotonic() - started
    return Run(detections, first)


class DecodedImages(torch.utils.data.Dataset):
    """What people write without Ray: a Dataset whose worker processes decode the files to tensors."""

    def __init__(self, paths: list[Path]):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.from_numpy(read_rgb(self.paths[index]).copy()).permute(2, 0, 1)


def run_dataloader(folder: Path, cfg, out: Path, batch_size: int) -> Run:
    """A PyTorch DataLoader with a worker process per spare core, pinned batches, the model on the device."""
    started = time.monotonic()
    model = load_model(cfg)
    loader = torch.utils.data.DataLoader(
        DecodedImages(sorted(folder.iterdir())), batch_size=batch_size, num_workers=max(1, (os.cpu_count() or 2) - 1),
        collate_fn=list, pin_memory=DEVICE.type == "cuda",
    )
    detections, first = 0, None
    with torch.inference_mode():
        for batch in loader:
            outputs = model([image.to(DEVICE, non_blocking=True).float().div_(255.0) for image in batch])
            detections += sum(len(output["labels"].cpu()) for output in outputs)
            first = first if first is not None else time.monotonic() - started
    return Run(detections, first)


class TutorialModel:
    """The tutorial's model class: built once per actor, called on batches of float CHW arrays."""

    def __init__(self, spec: ModelSpec):
        self.device = torch.device("cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu")
        self.model = build_model(spec)[0].to(self.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        inputs = [torch.from_numpy(image).to(self.device) for image in batch["image"]]
        with torch.inference_mode():
            outputs = self.model(inputs)
        return {"num_detections": np.array([len(output["labels"]) for output in outputs])}


def run_tutorial(folder: Path, cfg, out: Path, batch_size: int) -> Run:
    """read_images -> map(ToTensor + weights.transforms()) -> map_batches(model class, actor pool of 1),
    with Ray's defaults for everything else (one CPU per actor, so torch runs one thread; one GPU
    where there is one)."""
    from torchvision import transforms
    from torchvision.models import get_model_weights

    started = time.monotonic()
    if not ray.is_initialized():  # (it is only in the tests, which share one Ray to stay fast)
        ray.init(log_to_driver=False, include_dashboard=False)
    try:
        preprocess = transforms.Compose([transforms.ToTensor(), get_model_weights(cfg.model.name).DEFAULT.transforms()])
        images = ray.data.read_images(str(folder), mode="RGB")
        tensors = images.map(lambda row: {"image": preprocess(row["image"]).numpy()})
        detected = tensors.map_batches(
            TutorialModel,
            fn_constructor_kwargs=dict(spec=pipeline.model_spec(cfg)),
            compute=ray.data.ActorPoolStrategy(size=1),
            batch_size=batch_size,
            num_gpus=1 if DEVICE.type == "cuda" else 0,
        )
        detections, first = 0, None
        for batch in detected.iter_batches(batch_size=None):
            detections += int(batch["num_detections"].sum())
            first = first if first is not None else time.monotonic() - started
    finally:
        ray.shutdown()
    return Run(detections, first)


RUNNERS: dict[str, Callable[..., Run]] = {
    "model": run_model, "bare": run_bare, "dataloader": run_dataloader, "tutorial": run_tutorial, "app": run_app,
}


def warm_up(cfg) -> None:
    """One forward pass in this process first, so the in-process modes do not pay for torch's
    one-time initialisation (Ray's workers are fresh processes each time)."""
    model = load_model(cfg)
    with torch.inference_mode():
        model([torch.rand(3, 64, 64, device=DEVICE)])


def mode_names(args, batch_size: int) -> list[str]:
    """The modes to run; the bare loop once per batch size in --bare-batch-sizes (as bare@N)."""
    names = []
    for mode in args.modes:
        if mode == "bare":
            names.extend(f"bare@{size}" for size in (args.bare_batch_sizes or [batch_size]))
        else:
            names.append(mode)
    return names


def ratios(rates: dict[str, Optional[float]]) -> dict[str, Optional[float]]:
    """The app's rate over every other mode's; the bare loop's best batch size stands for "bare"."""
    bare = [rate for mode, rate in rates.items() if mode.startswith("bare@")]
    others = {mode: rate for mode, rate in rates.items() if mode != "app" and not mode.startswith("bare@")}
    if bare:  # None when no batch size has a rate (runs too short to tell), like any mode without one
        others["bare"] = max((rate for rate in bare if rate), default=None)
    app = rates.get("app")
    return {f"app_over_{mode}": round(app / rate, 3) if app and rate else None for mode, rate in others.items()}


def run(args, base: Path) -> dict:
    """Every model of --models at every precision of --precisions, each mode at the two input counts."""
    results = {}
    for model in args.models:
        counts = tuple(args.counts) if args.counts else DEFAULT_COUNTS[DEVICE.type].get(model, (8, 24))
        folders = {count: input_folder(base, f"{model}-{count}", count, args) for count in counts}
        for precision in args.precisions:
            cfg_overrides = model_overrides(model, args, precision)
            batch_size = model_batch_size(compose_config(cfg_overrides))
            warm_up(compose_config(cfg_overrides))
            modes = mode_names(args, batch_size)
            timings = {mode: [] for mode in modes}
            # Interleaved, so that a slow spell of the machine does not land on one mode only.
            for count in counts:
                for mode in modes:
                    name, _, size = mode.partition("@")
                    out = Path(tempfile.mkdtemp(dir=base, prefix=f"out-{name}-"))
                    mode_run = functools.partial(RUNNERS[name], folders[count], compose_config(cfg_overrides), out, int(size or batch_size))
                    timings[mode].append(timed(mode, mode_run, count))
                    shutil.rmtree(out, ignore_errors=True)
                    time.sleep(args.pause)  # the previous run's processes exit before the next starts
            summary = {mode: marginal(*runs) for mode, runs in timings.items()}
            results[model if precision == "fp32" else f"{model} {precision}"] = {
                "counts": list(counts),
                "batch_size": batch_size,
                "precision": precision,
                "device": str(DEVICE),
                "modes": summary,
                "ratios": ratios({mode: result["marginal_images_per_s"] for mode, result in summary.items()}),
                "runs": [asdict(t) for runs in timings.values() for t in runs],
            }
    return results


def lines(results: dict) -> list[str]:
    """The suite's report lines: a table per model and precision."""
    return [line for model, result in results.items() for line in model_lines(model, result)]


def model_lines(model: str, result: dict) -> list[str]:
    lines = [f"{model} on {result['device']}, batch {result['batch_size']}, runs of "
             f"{' and '.join(map(str, result['counts']))} images:",
             f"  {'mode':<10} {'marginal img/s':>14} {'start-up s':>10} {'first result s':>14} {'peak RSS MB':>11} {'det/img':>7}"]
    lines += [f"  {mode:<10} {number(m['marginal_images_per_s'], 14, 3)} {number(m['startup_s'], 10, 1)} "
              f"{number(m['first_result_s'], 14, 1)} {number(m['peak_rss_mb'], 11, 0)} {number(m['detections_per_image'], 7, 1)}"
              for mode, m in result["modes"].items()]
    described = ", ".join(f"{name.replace('_over_', '/')} = {number(value, 0, 2)}" for name, value in result["ratios"].items())
    return lines + [f"  marginal ratios: {described}"]
