"""Throughput and memory benchmark: `ray-detect bench [SUITE ...] [options]`.

throughput  For each model, on the same generated JPEGs (a Pascal-VOC-like mix of sizes and orientations)
            and the same model settings, in these modes:
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
standin     The app with a device stand-in in place of the model (it holds --stand-in-ms per image with
            the GIL released, as a CUDA call does, and returns 5 boxes per image), on one actor planned
            like a GPU actor, against the stand-in's own rate; and the detector's host time per image
            with a zero-time stand-in. Measures the overlap of decoding, host work and device time on a
            machine without a GPU.
decode      Images/s one core decodes to the 800-px model size: VOC-sized JPEGs and 12 MP photos.
memory      Peak memory of the app at two input counts (500 and 5,000 images by default).
inputs      The input stage at scale: a tree of 1 million files, manifests of 1 and 10 million paths,
            and a resume of 10 million committed rows; time to the first block and the driver's memory.
chaos       Faults injected into runs of --chaos-images images (app.chaos): worker nodes preempted and
            the driver killed, S3 throttled and down, the output volume full; one line per fault.
tiles       Tiled detection of large generated scenes (app.bench_tiles): the app against SAHI's sliced
            prediction loop, scenes/s and tiles/s, and how busy tiles keep a device stand-in.

Memory is the peak, sampled every 0.5 s, of the resident set size (RSS) summed over this process and
every process it started (Ray's GCS, raylet, agents and workers). Pages shared between processes
(Ray's object store, libraries) count once per process that maps them, so the sum is an upper bound.
Results go to a JSON file (benchmarks/results.json by default).
"""

import argparse
import concurrent.futures
import contextlib
import functools
import json
import logging
import multiprocessing
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
import torch
from omegaconf import OmegaConf
from PIL import Image

from app import chaos, cli, pipeline
from app.config import compose_config
from app.decode import (
    DECODED_SCHEMA,
    DecodeOptions,
    decode,
    decode_images,
    model_input_size,
)
from app.detector import Detector
from app.inputs import open_inputs, streamed_todo
from app.listing import input_rows
from app.model import ModelSpec, build_model, coco_categories
from app.output import dataset
from app.output.dataset import RESULT_SCHEMA, SETTINGS_NAME, write_json
from app.plan import DEFAULT_BATCH_SIZES, STREAMED_BLOCK_FILES
from app.precision import AUTOCAST_DTYPES, mixed_precision

# psutil comes with the bench extra: it is imported where used, so that importing this module works
# without it and app.cli can report it missing in one line.

PROG = "ray-detect bench"

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
SAMPLE_INTERVAL_S = 0.5

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- inputs


# Pascal VOC's common sizes, 3 landscape : 1 portrait as in VOC: the throughput runs cycle through them.
VOC_LIKE_SIZES = ((500, 375), (500, 333), (375, 500), (480, 360), (500, 281), (500, 375), (333, 500), (500, 400))


def write_jpegs(folder: Path, count: int, sizes, seed: int = 0) -> list[Path]:
    """`count` distinct photo-like JPEGs (smooth colour fields, shapes, sensor noise), the i-th of
    sizes[i % len(sizes)] (width, height)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        width, height = sizes[i % len(sizes)]
        ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
        image = np.empty((height, width, 3), np.float32)
        for channel in range(3):
            (fx, fy), phase = rng.uniform(0.5, 4, 2) / np.array([width, height]), rng.uniform(0, 2 * np.pi)
            image[..., channel] = 128 + 90 * np.sin(2 * np.pi * (fx * xs + fy * ys) + phase)
        for _ in range(rng.integers(3, 9)):
            x0, y0 = rng.integers(0, width), rng.integers(0, height)
            w, h = rng.integers(width // 10, width // 2), rng.integers(height // 10, height // 2)
            image[y0 : y0 + h, x0 : x0 + w] = rng.uniform(0, 255, 3)
        image += rng.normal(0, 6, image.shape)
        path = folder / f"img_{i:06d}.jpg"
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def input_folder(base: Path, name: str, count: int, args) -> Path:
    """A folder with `count` images: the first `count` of --images (sorted), or generated ones."""
    folder = base / name
    if args.images:
        sources = sorted(p for p in Path(args.images).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        if len(sources) < count:
            raise SystemExit(f"--images {args.images} holds {len(sources)} images, {count} needed")
        folder.mkdir(parents=True)
        for i, source in enumerate(sources[:count]):
            os.symlink(source.resolve(), folder / f"img_{i:06d}{source.suffix.lower()}")
        return folder
    pool = base / "_generated"
    have = sorted(pool.glob("*.jpg")) if pool.exists() else []
    if len(have) < count:
        write_jpegs(pool, count, args.sizes, seed=args.seed)
        have = sorted(pool.glob("*.jpg"))
    folder.mkdir(parents=True)
    for path in have[:count]:
        os.link(path, folder / path.name)
    return folder


# ---------------------------------------------------------------------------------------------- memory


class PeakMemory:
    """Samples the summed RSS of this process and its descendants in a background thread. RSS comes
    from counters the kernel keeps (/proc/PID/statm); PSS would need /proc/PID/smaps, whose reading
    walks a process's page tables under its memory-map lock and can stall a busy model process."""

    def __init__(self, interval_s: float = SAMPLE_INTERVAL_S):
        self.interval_s = interval_s
        self.peak_bytes = 0
        self.peak_driver_bytes = 0
        self.peak_processes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def sample(self) -> None:
        import psutil

        me = psutil.Process()
        total, count = 0, 0
        for process in [me, *me.children(recursive=True)]:
            try:
                rss = process.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            total, count = total + rss, count + 1
            if process.pid == me.pid:
                self.peak_driver_bytes = max(self.peak_driver_bytes, rss)
        if total > self.peak_bytes:
            self.peak_bytes, self.peak_processes = total, count

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


# ---------------------------------------------------------------------------------------------- modes

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class Timing:
    mode: str
    images: int
    seconds: float  # from the start of the mode (Ray start included) to the last result
    first_result_s: Optional[float]  # from the start of the mode to the first result row on the driver
    peak_rss_mb: float  # summed over the processes
    peak_driver_rss_mb: float  # this process alone
    detections: int


class Run(NamedTuple):
    """What a mode reports: detections, seconds to its first result, and, for the modes that prepare
    their inputs before the clock starts, the seconds timed (else the whole call is)."""

    detections: int
    first_result_s: Optional[float]
    timed_s: Optional[float] = None


def model_overrides(model: str, args, precision: str = "fp32") -> list[str]:
    overrides = [f"model={model}", "model.weights=none", f"model.score_threshold={args.score_threshold}",
                 f"model.max_detections={args.max_detections}", f"inference.precision={precision}"]
    if args.batch_size:
        overrides.append(f"inference.batch_size={args.batch_size}")
    return overrides


def model_batch_size(cfg) -> int:
    """The batch size the app would use on this machine's device."""
    if cfg.inference.batch_size is not None:
        return cfg.inference.batch_size
    return DEFAULT_BATCH_SIZES[cfg.model.name]["gpu" if DEVICE.type == "cuda" else "cpu"]


def load_model(cfg) -> torch.nn.Module:
    """The model for the modes without the app, at the precision the app runs it (app.precision: layers
    in half precision for fp16/bf16, box geometry in float32), so that every mode does the same arithmetic."""
    torch.set_num_threads(os.cpu_count() or 1)
    model = build_model(pipeline.model_spec(cfg))[0]
    return mixed_precision(model, AUTOCAST_DTYPES[cfg.inference.precision.value]).to(DEVICE)


def read_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.array(image.convert("RGB"))


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


def run_app(folder: Path, cfg, out: Path, batch_size: int, detector: type[Detector] = Detector) -> Run:
    """app.pipeline.run() as `python -m app` runs it: a local Ray started by the app, default settings.
    The time to the first result is when the first result rows reach the job's writer."""
    started = time.monotonic()
    first: list[float] = []

    def on_rows(rows: pa.Table) -> None:
        if not first:
            first.append(time.monotonic() - started)

    OmegaConf.update(cfg, "data.path", str(folder))
    OmegaConf.update(cfg, "output.path", str(out))
    try:
        summary = pipeline.run(cfg, detector=detector, on_rows=on_rows)
    finally:
        ray.shutdown()
    return Run(summary.detections, first[0])


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


def timed(mode: str, run: Callable[[], Run], images: int) -> Timing:
    with PeakMemory() as memory:
        started = time.monotonic()
        result = run()
        seconds = result.timed_s if result.timed_s is not None else time.monotonic() - started
    first = result.first_result_s
    timing = Timing(mode, images, round(seconds, 3), round(first, 3) if first is not None else None,
                    round(memory.peak_bytes / 2**20, 1), round(memory.peak_driver_bytes / 2**20, 1), result.detections)
    log.info("%-10s %5d images in %8.2f s (first result after %s s), peak RSS %.0f MB, %d detections",
             mode, images, seconds, timing.first_result_s, timing.peak_rss_mb, result.detections)
    return timing


def marginal(small: Timing, large: Timing) -> dict:
    """Rate over the extra images of the larger run, and the fixed cost that rate implies."""
    extra_images, extra_seconds = large.images - small.images, large.seconds - small.seconds
    rate = extra_images / extra_seconds if extra_seconds > 0 else None
    return {
        "marginal_images_per_s": round(rate, 4) if rate else None,
        "startup_s": round(small.seconds - small.images / rate, 2) if rate else None,
        "first_result_s": small.first_result_s,
        "overall_images_per_s": round(large.images / large.seconds, 4),
        "peak_rss_mb": max(small.peak_rss_mb, large.peak_rss_mb),
        "detections_per_image": round(large.detections / large.images, 2),
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


def throughput(args, base: Path) -> dict:
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
                    run = functools.partial(RUNNERS[name], folders[count], compose_config(cfg_overrides), out, int(size or batch_size))
                    timings[mode].append(timed(mode, run, count))
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


# ---------------------------------------------------------------------------------------------- decode

DECODE_CASES = {"500x375": [(500, 375)], "12 MP": [(4000, 3000)]}


def decode_rate(args, base: Path) -> dict:
    """Images/s one core decodes for the 800-px models (read, decode, resize: the app's decode stage),
    on VOC-sized JPEGs and on 12 MP photos; and the same images decoded whole before the resize."""
    cfg = compose_config(model_overrides("fasterrcnn_resnet50_fpn_v2", args))
    options = DecodeOptions(cfg.data.max_file_bytes, cfg.data.max_image_pixels, cfg.model.min_size, cfg.model.max_size)
    filesystem = pa.fs.LocalFileSystem()
    results = {}
    for name, sizes in DECODE_CASES.items():
        count = 40 if sizes[0][0] < 1000 else 8
        paths = write_jpegs(base / f"decode-{name.replace(' ', '')}", count, sizes, seed=args.seed)
        table = input_rows([str(p) for p in paths], [p.stat().st_size for p in paths])
        decode_images(table, filesystem=filesystem, uri_prefix="", options=options)  # warm the page cache
        started = time.perf_counter()
        decode_images(table, filesystem=filesystem, uri_prefix="", options=options)
        rates = {"reduced": round(count / (time.perf_counter() - started), 1)}
        started = time.perf_counter()
        for path in paths:  # the same, decoded whole before the resize
            with Image.open(path) as image:
                size = model_input_size(*image.size, cfg.model.min_size, cfg.model.max_size)
                image.convert("RGB").resize(size, Image.Resampling.BILINEAR)
        rates["full"] = round(count / (time.perf_counter() - started), 1)
        results[name] = rates
        log.info("decode %s: %s images/s per core", name, rates)
    return results


# ---------------------------------------------------------------------------------------------- stand-in

STAND_IN_DETECTIONS = 5


class StandInModel(torch.nn.Module):
    """Stands in for a model on an accelerator: holds each batch for `seconds_per_image` per image with
    the GIL released (as a CUDA call does while the device works) and returns STAND_IN_DETECTIONS
    boxes per image, spread over it."""

    def __init__(self, seconds_per_image: float):
        super().__init__()
        self.seconds_per_image = seconds_per_image

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        if self.seconds_per_image:
            time.sleep(self.seconds_per_image * len(images))
        steps = torch.arange(STAND_IN_DETECTIONS, dtype=torch.float32) / STAND_IN_DETECTIONS
        outputs = []
        for image in images:
            height, width = image.shape[-2:]
            corners = torch.stack([steps * width, steps * height, (steps + 0.2) * width, (steps + 0.2) * height], dim=1)
            outputs.append({"boxes": corners, "scores": 1 - steps / 2, "labels": torch.arange(1, STAND_IN_DETECTIONS + 1)})
        return outputs


def stand_in_detector(seconds_per_image: float) -> type[Detector]:
    """The app's Detector with the stand-in in place of the model."""

    class StandInDetector(Detector):
        def load_model(self, spec: ModelSpec):
            return StandInModel(seconds_per_image), coco_categories(spec.name)

    return StandInDetector


def detector_host_time(batches: int, images_per_batch: int, size=(1066, 800)) -> dict:
    """The detector's own time per image with a zero-time stand-in: everything it does around the
    model (pixel views, grouping, staging, results to rows) on decoded 800-px images."""
    spec = ModelSpec("fasterrcnn_resnet50_fpn_v2", "none", 0.5, 800, 1333)
    detector = stand_in_detector(0.0)(spec, num_threads=1, batch_size=8)
    width, height = size
    pixels = np.random.default_rng(0).integers(0, 256, width * height * 3, dtype=np.uint8).tobytes()
    batch = pa.Table.from_pylist(
        [dict(path=f"s3://bucket/images/{i:08d}.jpg", width=500, height=375, pixels=pixels, pixel_width=width,
              pixel_height=height, error_kind=None, error=None) for i in range(images_per_batch)],
        schema=DECODED_SCHEMA,
    )
    detector(batch)  # warm
    started = time.perf_counter()
    for _ in range(batches):
        rows = detector(batch)
    seconds = time.perf_counter() - started
    assert rows.num_rows == images_per_batch and pc.sum(rows["num_detections"]).as_py() == images_per_batch * STAND_IN_DETECTIONS
    return {"image_size": list(size), "detections_per_image": STAND_IN_DETECTIONS,
            "ms_per_image": round(1000 * seconds / (batches * images_per_batch), 4)}


def stand_in(args, base: Path) -> dict:
    """The app with the stand-in at --stand-in-ms per image, one actor planned like a GPU actor (one
    CPU, batch 8, the other CPUs decode), against the stand-in's own rate; and the detector's host time."""
    model = "fasterrcnn_resnet50_fpn_v2"
    counts = tuple(args.counts) if args.counts else (200, 1000)
    overrides = [*model_overrides(model, args), "inference.num_actors=1", "inference.num_cpus_per_actor=1", "inference.batch_size=8"]
    detector = stand_in_detector(args.stand_in_ms / 1000)
    runs = []
    for count in counts:
        folder = input_folder(base, f"stand-in-{count}", count, args)
        out = Path(tempfile.mkdtemp(dir=base, prefix="out-stand-in-"))
        run = functools.partial(run_app, folder, compose_config(overrides), out, 8, detector)
        runs.append(timed("app", run, count))
        shutil.rmtree(out, ignore_errors=True)
        time.sleep(args.pause)
    result = marginal(*runs)
    stand_in_rate = 1000 / args.stand_in_ms
    return {
        "ms_per_image": args.stand_in_ms,
        "counts": list(counts),
        "app": result,
        "ratio": round(result["marginal_images_per_s"] / stand_in_rate, 3) if result["marginal_images_per_s"] else None,
        "runs": [asdict(run) for run in runs],
        "host_time": detector_host_time(batches=20, images_per_batch=32),
    }


def memory(args, base: Path) -> dict:
    model = args.memory_model
    cfg_overrides = model_overrides(model, args)
    runs = []
    for count in args.memory_counts:
        folder = input_folder(base, f"memory-{count}", count, args)
        out = Path(tempfile.mkdtemp(dir=base, prefix="out-memory-"))
        run = functools.partial(run_app, folder, compose_config(cfg_overrides), out, 0)
        runs.append(timed("app", run, count))
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(folder, ignore_errors=True)
    small, large = runs[0], runs[-1]
    return {
        "model": model,
        "runs": [asdict(run) for run in runs],
        "peak_ratio": round(large.peak_rss_mb / small.peak_rss_mb, 3),
    }


def input_stage(args, base: Path) -> dict:
    """The input stage alone, as the app runs it for inputs too large for the driver to list (a tree of
    --tree-files files, manifests of --manifest-paths paths, and a resume where a manifest's every path
    already has its row): time to the first block of inputs to decode, time to the last, and the
    driver's peak RSS above its size at the case's start. The cases run in turn in one fresh process,
    on one Ray. Paths in the manifests name files that do not exist: nothing is decoded. Then the app
    itself on the largest manifest, to its first result."""
    tree = base / "tree"
    for start in range(0, args.tree_files, 1000):
        folder = tree / f"d{start // 1000:05d}"
        folder.mkdir(parents=True)
        for i in range(start, min(start + 1000, args.tree_files)):
            (folder / f"f{i:08d}.jpg").touch()
    named = {f"tree of {args.tree_files} files": [f"data.path={tree}", f"output.path={base / 'out-tree'}"]}
    for count in args.manifest_paths:
        manifest = write_manifest(base / f"manifest-{count}", count)
        named[f"manifest of {count} paths"] = [f"data.manifest={manifest}", f"output.path={base / f'out-{count}'}"]
    count = max(args.manifest_paths)
    resume = [f"data.manifest={base / f'manifest-{count}'}", f"output.path={base / 'out-resume'}"]
    write_committed(base / "out-resume", base / f"manifest-{count}", compose_config([*model_overrides(args.memory_model, args), *resume]))
    named[f"resume: {count} paths, every one committed"] = resume
    cases = in_fresh_process(measure_input_stages, named)
    shutil.rmtree(tree, ignore_errors=True)
    cases[f"manifest of {count} paths"]["first_result_s"] = first_result(
        [*model_overrides(args.memory_model, args), f"data.manifest={base / f'manifest-{count}'}", f"output.path={base / 'out-first'}"])
    return cases


MANIFEST_FILE_PATHS = 1_000_000


def write_manifest(folder: Path, count: int) -> Path:
    """A folder of Parquet files listing `count` paths of 1,000 files a folder, as an inventory would."""
    folder.mkdir(parents=True)
    for start in range(0, count, MANIFEST_FILE_PATHS):
        numbers = range(start, min(start + MANIFEST_FILE_PATHS, count))
        paths = [f"/data/images/{i // 1000:06d}/{i:09d}.jpg" for i in numbers]
        pq.write_table(pa.table({"path": paths, "size": np.full(len(paths), 150_000)}), folder / f"part-{start:010d}.parquet")
    return folder


def write_committed(output: Path, manifest: Path, cfg) -> None:
    """An output whose committed rows cover every path of the manifest (error rows, no detections)."""
    output.mkdir(parents=True)
    write_json(pa.fs.LocalFileSystem(), str(output / SETTINGS_NAME), dataset.settings(cfg, pipeline.model_spec(cfg).weights))
    for number, file in enumerate(sorted(manifest.glob("*.parquet"))):
        paths = pq.read_table(file, columns=["path"]).column("path").combine_chunks()
        n = len(paths)
        empty = {name: pa.ListArray.from_arrays(np.zeros(n + 1, np.int32), pa.array([], field.type.value_type))
                 for name, field in zip(RESULT_SCHEMA.names, RESULT_SCHEMA) if pa.types.is_list(field.type)}
        columns = {name: empty.get(name, pa.nulls(n, field.type)) for name, field in zip(RESULT_SCHEMA.names, RESULT_SCHEMA)}
        columns.update(path=paths, num_detections=pa.array(np.zeros(n, np.int32)), error_kind=pa.array(["unreadable"] * n))
        pq.write_table(pa.table(columns, schema=RESULT_SCHEMA), output / f"part-bench-{number:06d}.parquet")


def measure_input_stages(cases: dict[str, list[str]]) -> dict[str, dict]:
    """measure_input_stage for each case's overrides, in turn, on one Ray."""
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        return {name: measure_input_stage(overrides) for name, overrides in cases.items()}
    finally:
        ray.shutdown()


def measure_input_stage(overrides: list[str]) -> dict:
    """One case of the inputs suite; its peak RSS counts from its start (the peak reset first)."""
    import psutil

    reset_peak_rss()
    idle = psutil.Process().memory_info().rss
    cfg = compose_config(overrides)
    started = time.monotonic()
    inputs = open_inputs(cfg.data)
    assert inputs.table is None, "the inputs are small enough for the driver: no input stage to measure"
    output = dataset.locate(cfg)
    output.filesystem.create_dir(output.path, recursive=True)
    todo, tally, _ = streamed_todo(cfg.data, inputs, output, tasks=max(1, (os.cpu_count() or 2) - 1), block_rows=STREAMED_BLOCK_FILES)
    first, rows = None, 0
    for batch in todo.iter_batches(batch_format="pyarrow", batch_size=None):
        first = first or time.monotonic() - started
        rows += batch.num_rows
    seconds = time.monotonic() - started
    inputs_seen = ray.get(tally.total.remote())
    return {
        "inputs": inputs_seen, "todo": rows, "first_block_s": round(first or seconds, 2), "seconds": round(seconds, 2),
        "driver_peak_above_idle_mb": round((peak_rss() - idle) / 1e6, 1), "driver_peak_mb": round(peak_rss() / 1e6, 1),
    }


def first_result(overrides: list[str]) -> float:
    """Seconds from starting `python -m app` to its first committed file of result rows (committed at
    once: output.commit_interval_s=0); the run is then stopped."""
    output = Path(next(o for o in overrides if o.startswith("output.path=")).partition("=")[2])
    started = time.monotonic()
    process = subprocess.Popen([sys.executable, "-m", "app", *overrides, "output.commit_interval_s=0"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        while not any(output.glob("part-*.parquet")):
            if process.poll() is not None:
                raise RuntimeError(f"python -m app stopped with exit code {process.returncode} before its first result")
            time.sleep(0.2)
        return round(time.monotonic() - started, 1)
    finally:
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def reset_peak_rss() -> None:
    """Start this process's peak RSS (VmHWM) again from its current size (Linux 4.0 and newer)."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def peak_rss() -> int:
    """This process's peak resident set size in bytes: Linux's VmHWM. Not getrusage's ru_maxrss, which in
    a process started by fork and exec also counts the forking parent's size (bench's own, torch loaded)."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))


def in_fresh_process(function, *arguments):
    """function(*arguments) in a new Python process (spawned, not forked), for its own peak memory."""
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, *arguments).result()


# ---------------------------------------------------------------------------------------------- report


def machine() -> dict:
    import psutil

    return {
        "cpus": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "processor": platform.processor() or platform.machine(),
        "cpu_model": cpu_model(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return ""


def number(value: Optional[float], width: int, decimals: int) -> str:
    """value formatted, or n/a where a run too short to time gave none."""
    if value is None or value != value:
        return f"{'n/a':>{width}}"
    return f"{value:>{width}.{decimals}f}"


def throughput_lines(model: str, result: dict) -> list[str]:
    lines = [f"{model} on {result['device']}, batch {result['batch_size']}, runs of "
             f"{' and '.join(map(str, result['counts']))} images:",
             f"  {'mode':<10} {'marginal img/s':>14} {'start-up s':>10} {'first result s':>14} {'peak RSS MB':>11} {'det/img':>7}"]
    lines += [f"  {mode:<10} {number(m['marginal_images_per_s'], 14, 3)} {number(m['startup_s'], 10, 1)} "
              f"{number(m['first_result_s'], 14, 1)} {number(m['peak_rss_mb'], 11, 0)} {number(m['detections_per_image'], 7, 1)}"
              for mode, m in result["modes"].items()]
    ratios = ", ".join(f"{name.replace('_over_', '/')} = {number(value, 0, 2)}" for name, value in result["ratios"].items())
    return lines + [f"  marginal ratios: {ratios}"]


def standin_lines(standin: dict) -> list[str]:
    app, host = standin["app"], standin["host_time"]
    return [
        f"device stand-in at {standin['ms_per_image']} ms/image ({1000 / standin['ms_per_image']:.1f} images/s), "
        f"app with one actor, runs of {' and '.join(map(str, standin['counts']))} images: "
        f"{number(app['marginal_images_per_s'], 0, 2)} images/s marginal, ratio {number(standin['ratio'], 0, 3)}",
        f"detector host time, zero-time stand-in, {host['image_size'][0]}x{host['image_size'][1]} images with "
        f"{host['detections_per_image']} detections: {host['ms_per_image']:.3f} ms/image",
    ]


def memory_line(mem: dict) -> str:
    runs = ", ".join(f"{r['images']} images: {r['peak_rss_mb']:.0f} MB in {r['seconds']:.0f} s" for r in mem["runs"])
    return f"memory ({mem['model']}, app): peak RSS {runs}; ratio {mem['peak_ratio']:.2f}"


def input_stage_line(name: str, case: dict) -> str:
    first = f"; the app's first result after {case['first_result_s']:.1f} s" if "first_result_s" in case else ""
    return (f"input stage, {name}: first block after {case['first_block_s']:.1f} s, all {case['inputs']} in "
            f"{case['seconds']:.1f} s ({case['todo']} to do), driver peak RSS +{case['driver_peak_above_idle_mb']:.0f} MB "
            f"(peak {case['driver_peak_mb']:.0f} MB){first}")


def report(results: dict) -> str:
    """The results as text, a few lines per suite."""
    info = results["machine"]
    lines = [f"machine: {info['cpus']} CPUs ({info['cpu_model']}), {info['memory_gb']} GB, "
             f"load average at start {info['load_average_at_start'][0]}"]
    for model, result in results.get("throughput", {}).items():
        lines += throughput_lines(model, result)
    if "standin" in results:
        lines += standin_lines(results["standin"])
    lines += [f"decode {name} JPEGs to 800 px, one core: {rates['reduced']:.1f} images/s "
              f"({rates['full']:.1f} decoding them at full size)" for name, rates in results.get("decode", {}).items()]
    if "memory" in results:
        lines.append(memory_line(results["memory"]))
    lines += [input_stage_line(name, case) for name, case in results.get("inputs", {}).items()]
    lines += chaos.lines(results.get("chaos", []))
    if "tiles" in results:
        from app import bench_tiles

        lines += bench_tiles.lines(results["tiles"])
    return "\n".join(lines)


SUITES = ("throughput", "standin", "decode", "memory", "inputs", "chaos", "tiles")


def size_arg(text: str) -> tuple[int, int]:
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not WIDTHxHEIGHT") from None
    return width, height


def parse_args(argv=None) -> argparse.Namespace:
    parser = cli.CommandParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("suites", nargs="*", metavar="SUITE",
                        help="throughput (default), standin, decode, memory, inputs, chaos, tiles or all")
    parser.add_argument("--models", nargs="+", default=list(MODELS), help="torchvision model names")
    parser.add_argument("--modes", nargs="+", choices=MODES,
                        help=f"throughput modes (default: {' '.join(CPU_MODES)}; with CUDA {' '.join(GPU_MODES)})")
    parser.add_argument("--precisions", nargs="+", default=["fp32"], choices=list(AUTOCAST_DTYPES),
                        help="inference.precision values to run every mode at (fp16/bf16: layers in half precision)")
    parser.add_argument("--bare-batch-sizes", nargs="+", type=int,
                        help="batch sizes of the bare loop; the best stands for it (default on a CPU: 1 2 4)")
    parser.add_argument("--counts", nargs=2, type=int, help="the two input counts (default: per model)")
    parser.add_argument("--sizes", nargs="+", type=size_arg, default=list(VOC_LIKE_SIZES), metavar="WxH",
                        help="sizes of generated images, in turn (default: a Pascal-VOC-like mix, 3 landscape : 1 portrait)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--images", help="a folder of JPEG/PNG images to use instead of generated ones")
    parser.add_argument("--batch-size", type=int, help="inference.batch_size (default: the app's for the model and device)")
    parser.add_argument("--score-threshold", type=float, default=0.5,
                        help="model.score_threshold, the same in every mode (default: the app's 0.5)")
    parser.add_argument("--max-detections", type=int, default=5,
                        help="model.max_detections, the same in every mode: random weights detect 100 per image or none")
    parser.add_argument("--stand-in-ms", type=float, default=10.0, help="the device stand-in's milliseconds per image")
    parser.add_argument("--memory-model", default="fasterrcnn_mobilenet_v3_large_320_fpn")
    parser.add_argument("--memory-counts", nargs=2, type=int, default=[500, 5000])
    parser.add_argument("--tree-files", type=int, default=1_000_000, help="files of the inputs suite's tree")
    parser.add_argument("--manifest-paths", nargs="+", type=int, default=[1_000_000, 10_000_000],
                        help="paths of the inputs suite's manifests; the largest is also resumed")
    parser.add_argument("--chaos-images", type=int, default=2000, help="images of the chaos suite's runs")
    parser.add_argument("--removals", type=int, default=5, help="worker nodes the chaos suite's preemption removes")
    parser.add_argument("--tiles-model", default="fasterrcnn_mobilenet_v3_large_320_fpn", help="the tiles suite's model")
    parser.add_argument("--tiles-counts", nargs=2, type=int, default=[2, 5], help="the two scene counts of the tiles suite")
    parser.add_argument("--tiles-sizes", nargs="+", type=size_arg, metavar="WxH",
                        help="sizes of the tiles suite's scenes, in turn (default: 4000x3000 3000x4000 6000x4000)")
    parser.add_argument("--pause", type=float, default=5.0, help="seconds between runs")
    parser.add_argument("--workdir", help="where inputs and outputs go (default: a temporary folder)")
    parser.add_argument("--out", default="benchmarks/results.json", help="JSON result file")
    args = parser.parse_args(argv)
    args.suites = args.suites or ["throughput"]
    unknown = set(args.suites) - {*SUITES, "all"}
    if unknown:
        parser.error(f"unknown suite {', '.join(sorted(unknown))}: choose {', '.join(SUITES)} or all")
    if args.modes is None:
        args.modes = list(GPU_MODES if DEVICE.type == "cuda" else CPU_MODES)
    if args.bare_batch_sizes is None and DEVICE.type == "cpu":
        args.bare_batch_sizes = [1, 2, 4]
    if args.tiles_counts[0] >= args.tiles_counts[1]:
        parser.error("--tiles-counts: the second count must be larger")
    if args.counts and args.counts[0] >= args.counts[1]:
        parser.error("--counts: the second count must be larger")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # The app's progress lines are muted: "app" is the parent of its modules' loggers (app.pipeline, ...),
    # which inherit its level; this module's own logger (app.bench) stays at INFO.
    logging.getLogger("app").setLevel(logging.WARNING)
    log.setLevel(logging.INFO)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    base = Path(args.workdir or tempfile.mkdtemp(prefix="ray-detect-bench-"))
    base.mkdir(parents=True, exist_ok=True)
    results = {"machine": machine(), "command": f"{PROG} " + " ".join(argv or [])}
    try:
        suites = set(SUITES) if "all" in args.suites else set(args.suites)
        if "throughput" in suites:
            results["throughput"] = throughput(args, base)
        if "standin" in suites:
            results["standin"] = stand_in(args, base)
        if "decode" in suites:
            results["decode"] = decode_rate(args, base)
        if "memory" in suites:
            results["memory"] = memory(args, base)
        if "inputs" in suites:
            results["inputs"] = input_stage(args, base)
        if "chaos" in suites:
            images = input_folder(base, "chaos", args.chaos_images, args)
            results["chaos"] = chaos.chaos(images, args.chaos_images, args.removals, base)
        if "tiles" in suites:
            from app import bench_tiles  # imported here: it builds on this module's harness

            results["tiles"] = bench_tiles.tiles(args, base)
    finally:
        if not args.workdir:
            shutil.rmtree(base, ignore_errors=True)
    results["report"] = report(results)
    print(results["report"])
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    sys.exit(cli.main(["bench", *sys.argv[1:]]))
