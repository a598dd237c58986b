"""The benchmark's throughput suite (`ray-detect bench throughput`). For each model, on the same generated
JPEGs (a Pascal-VOC-like mix of sizes and orientations) and the same model settings, in these modes:
  model       the model alone: images decoded and resized beforehand, pinned, batches in file
              order (not grouped by shape); copy in, forward, outputs out (GPU default);
  bare        decode + forward in a plain loop in this process, torch on every core (CPU default);
  dataloader  a PyTorch DataLoader whose worker processes decode, the model in this process
              (GPU default);
  tutorial    Ray's tutorial pattern: read_images -> map(ToTensor + weights.transforms())
              -> map_batches(model class) on one actor (one GPU where there is one);
  app         app.pipeline.run() end to end with its defaults on a local Ray.
The baselines (every mode but the app) run at each batch size of --baseline-batch-sizes (as mode@N); each
baseline's fastest batch size stands for it. Every mode runs --repeats times on the same --count images,
interleaved. A run's rate is taken from the arrival times of its results at the driver, after a warm-up
(the first --warm-up share of its images), so start-up (Ray, actors, model build, first forward) cancels
within the run instead of between two runs; the time to the first result is reported on its own. Each
figure is the median of the repeats with their range; the app's ratio over a baseline is taken repeat by
repeat. --precisions fp32 fp16 repeats it all in half precision.
"""

import functools
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np
import ray
import torch

from app import pipeline
from app.bench.harness import (
    DEVICE,
    Arrivals,
    Run,
    Timing,
    input_folder,
    load_model,
    model_batch_size,
    model_overrides,
    number,
    rate_after_warm_up,
    read_rgb,
    run_app,
    spread,
    timed,
)
from app.config import compose_config
from app.decode import DecodeOptions, decode
from app.model import ModelSpec, build_model


MODELS = ("fasterrcnn_mobilenet_v3_large_320_fpn", "fasterrcnn_resnet50_fpn_v2")


# Images per throughput run, per model and device: the heavy model is ~100x slower on a CPU, and a GPU runs
# either 50-500x faster than a CPU does. Enough that the timed part after warm-up spans many arrivals.
DEFAULT_COUNTS = {
    "cpu": {"fasterrcnn_mobilenet_v3_large_320_fpn": 200, "fasterrcnn_resnet50_fpn_v2": 16},
    "cuda": {"fasterrcnn_mobilenet_v3_large_320_fpn": 2500, "fasterrcnn_resnet50_fpn_v2": 1000},
}

# The baselines' batch sizes swept by default: on a CPU the heavy model gains nothing from batches; on a
# GPU the model is host-bound at 8 and was fastest at 16 on an H200 (docs/performance.md).
DEFAULT_BASELINE_BATCH_SIZES = {"cpu": [1, 2, 4], "cuda": [8, 16, 32]}


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
    arrivals, detections = Arrivals(), 0
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            inputs = [image.to(DEVICE, non_blocking=True).float().mul_(1 / 255) for image in images[start : start + batch_size]]
            outputs = [{key: value.cpu() for key, value in output.items()} for output in model(inputs)]
            detections += sum(len(output["labels"]) for output in outputs)
            arrivals.add(len(outputs))
    return Run(detections, arrivals.first_s, time.monotonic() - arrivals.started, tuple(arrivals.times))


def run_bare(folder: Path, cfg, out: Path, batch_size: int) -> Run:
    """Decode and forward in one loop in this process, torch threads = every core."""
    arrivals = Arrivals()
    model = load_model(cfg)
    paths = sorted(folder.iterdir())
    detections = 0
    with torch.inference_mode():
        for start in range(0, len(paths), batch_size):
            tensors = [torch.from_numpy(read_rgb(path)).to(DEVICE).permute(2, 0, 1).float().div_(255.0) for path in paths[start : start + batch_size]]
            outputs = model(tensors)
            detections += sum(len(output["labels"].cpu()) for output in outputs)
            arrivals.add(len(outputs))
    return Run(detections, arrivals.first_s, arrivals=tuple(arrivals.times))


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
    arrivals = Arrivals()
    model = load_model(cfg)
    loader = torch.utils.data.DataLoader(
        DecodedImages(sorted(folder.iterdir())), batch_size=batch_size, num_workers=max(1, (os.cpu_count() or 2) - 1),
        collate_fn=list, pin_memory=DEVICE.type == "cuda",
    )
    detections = 0
    with torch.inference_mode():
        for batch in loader:
            outputs = model([image.to(DEVICE, non_blocking=True).float().div_(255.0) for image in batch])
            detections += sum(len(output["labels"].cpu()) for output in outputs)
            arrivals.add(len(outputs))
    return Run(detections, arrivals.first_s, arrivals=tuple(arrivals.times))


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

    arrivals = Arrivals()
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
        detections = 0
        for batch in detected.iter_batches(batch_size=None):
            detections += int(batch["num_detections"].sum())
            arrivals.add(len(batch["num_detections"]))
    finally:
        ray.shutdown()
    return Run(detections, arrivals.first_s, arrivals=tuple(arrivals.times))


RUNNERS: dict[str, Callable[..., Run]] = {
    "model": run_model, "bare": run_bare, "dataloader": run_dataloader, "tutorial": run_tutorial, "app": run_app,
}


def warm_up_process(cfg) -> None:
    """One forward pass in this process first, so the in-process modes do not pay for torch's
    one-time initialisation (Ray's workers are fresh processes each time)."""
    model = load_model(cfg)
    with torch.inference_mode():
        model([torch.rand(3, 64, 64, device=DEVICE)])


def mode_names(args) -> list[str]:
    """The modes to run: each baseline once per batch size of --baseline-batch-sizes (as mode@N), the app
    at its own batch size."""
    return [mode if mode == "app" else f"{mode}@{size}" for mode in args.modes
            for size in ([None] if mode == "app" else args.baseline_batch_sizes)]


def warm_up_images(count: int, share: float) -> int:
    """Images a run's warm-up takes: the first `share` of them, at least one."""
    return max(1, math.ceil(count * share))


def mode_summary(runs: list[Timing], warm_up: int) -> dict:
    """A mode's repeats: each one's rate after warm-up, their median and range, the median time to the
    first result, the peak memory of any repeat and the detections per image."""
    rates = [rate_after_warm_up(run.arrivals, warm_up) for run in runs]
    firsts = [run.first_result_s for run in runs]
    return {
        "images_per_s": spread(rates),
        "rates": rates,
        "first_result_s": spread(firsts, 3)["median"],
        "peak_rss_mb": max(run.peak_rss_mb for run in runs),
        "detections_per_image": round(sum(run.detections for run in runs) / sum(run.images for run in runs), 2),
    }


def best_batch_sizes(modes: dict[str, dict]) -> dict[str, str]:
    """Each baseline's fastest batch size by median rate (the first of equals), as {baseline: "baseline@N"};
    a baseline none of whose sizes has a rate is left out."""
    best: dict[str, str] = {}
    for mode, summary in modes.items():
        baseline, _, size = mode.partition("@")
        rate = summary["images_per_s"]["median"]
        if size and rate is not None and (baseline not in best or rate > modes[best[baseline]]["images_per_s"]["median"]):
            best[baseline] = mode
    return best


def ratios(modes: dict[str, dict]) -> dict[str, dict]:
    """The app's rate over each baseline at its best batch size, repeat by repeat (the repeats ran
    interleaved, so a slow spell of the machine falls on both sides of a ratio), as a median and range;
    then over the fastest baseline, as app_over_best."""
    app = modes.get("app")
    if app is None:
        return {}
    best = best_batch_sizes(modes)
    result = {}
    for baseline, mode in best.items():
        each = [round(a / b, 4) if a and b else None for a, b in zip(app["rates"], modes[mode]["rates"])]
        result[f"app_over_{baseline}"] = {"baseline": mode, **spread(each), "ratios": each}
    if best:
        fastest = max(best, key=lambda baseline: modes[best[baseline]]["images_per_s"]["median"])
        result["app_over_best"] = result[f"app_over_{fastest}"]
    return result


def run(args, base: Path) -> dict:
    """Every model of --models at every precision of --precisions: each mode --repeats times on --count
    images, interleaved."""
    results = {}
    for model in args.models:
        count = args.count or DEFAULT_COUNTS[DEVICE.type].get(model, 24)
        folder = input_folder(base, f"{model}-{count}", count, args)
        warm_up = warm_up_images(count, args.warm_up)
        for precision in args.precisions:
            cfg_overrides = model_overrides(model, args, precision)
            if args.actors_per_gpu:
                cfg_overrides.append(f"inference.actors_per_gpu={args.actors_per_gpu}")  # the app's; baselines have one model
            cfg_overrides += args.app_overrides  # the app's; the baselines read none of them
            batch_size = model_batch_size(compose_config(cfg_overrides))
            warm_up_process(compose_config(cfg_overrides))
            modes = mode_names(args)
            timings: dict[str, list[Timing]] = {mode: [] for mode in modes}
            # Interleaved, so that a slow spell of the machine does not land on one mode only.
            for _ in range(args.repeats):
                for mode in modes:
                    name, _, size = mode.partition("@")
                    out = Path(tempfile.mkdtemp(dir=base, prefix=f"out-{name}-"))
                    mode_run = functools.partial(RUNNERS[name], folder, compose_config(cfg_overrides), out, int(size or batch_size))
                    timings[mode].append(timed(mode, mode_run, count))
                    shutil.rmtree(out, ignore_errors=True)
                    time.sleep(args.pause)  # the previous run's processes exit before the next starts
            summary = {mode: mode_summary(runs, warm_up) for mode, runs in timings.items()}
            results[model if precision == "fp32" else f"{model} {precision}"] = {
                "count": count,
                "warm_up_images": warm_up,
                "repeats": args.repeats,
                "batch_size": batch_size,
                "baseline_batch_sizes": list(args.baseline_batch_sizes),
                "precision": precision,
                "device": str(DEVICE),
                "modes": summary,
                "best_batch_sizes": {baseline: int(mode.partition("@")[2]) for baseline, mode in best_batch_sizes(summary).items()},
                "ratios": ratios(summary),
                "runs": [asdict(t) for runs in timings.values() for t in runs],
            }
    return results


def lines(results: dict) -> list[str]:
    """The suite's report lines: a table per model and precision."""
    return [line for model, result in results.items() for line in model_lines(model, result)]


def figure(values: dict, decimals: int) -> str:
    """A median and its range: 12.345 (12.001-12.877)."""
    if values["median"] is None:
        return "n/a"
    return f"{values['median']:.{decimals}f} ({values['min']:.{decimals}f}-{values['max']:.{decimals}f})"


def model_lines(model: str, result: dict) -> list[str]:
    lines = [f"{model} on {result['device']}, app batch {result['batch_size']}, {result['count']} images a run, "
             f"rates after the first {result['warm_up_images']}, median (min-max) of {result['repeats']} repeats:",
             f"  {'mode':<13} {'images/s':>27} {'first result s':>14} {'peak RSS MB':>11} {'det/img':>7}"]
    lines += [f"  {mode:<13} {figure(m['images_per_s'], 3):>27} {number(m['first_result_s'], 14, 1)} "
              f"{number(m['peak_rss_mb'], 11, 0)} {number(m['detections_per_image'], 7, 1)}"
              for mode, m in result["modes"].items()]
    described = ", ".join(f"app/{ratio['baseline']} = {figure(ratio, 2)}" for name, ratio in result["ratios"].items()
                          if name != "app_over_best")
    return lines + [f"  ratios, repeat by repeat: {described or 'n/a'}"]
