"""Throughput and memory benchmark: `python -m app.bench [throughput] [memory] [listing] [all] [options]`.

throughput  For each model, on the same generated JPEGs and the same model settings, three ways:
              bare      decode + forward in a plain loop in this process, torch on every core;
              app       app.pipeline.run() end to end with its default CPU settings on a local Ray;
              tutorial  Ray's tutorial pattern: read_images -> map(ToTensor + weights.transforms())
                        -> map_batches(model class) on an actor pool, as written but for the GPU.
            Each runs at two input counts; the marginal rate (extra images / extra seconds) cancels
            the fixed start-up cost (Ray, actors, model build), which is reported on its own along
            with the time to the first result row.
memory      Peak memory of the app at two input counts (500 and 5,000 images by default).
listing     Listing and planning many small files: app.pipeline.run() up to the start of execution.

Memory is the peak, sampled every 0.5 s, of the resident set size (RSS) summed over this process and
every process it started (Ray's GCS, raylet, agents and workers). Pages shared between processes
(Ray's object store, libraries) count once per process that maps them, so the sum is an upper bound.
Results go to a JSON file (benchmarks/results.json by default).
"""

import argparse
import contextlib
import json
import logging
import os
import platform
import shutil
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import psutil
import ray
import torch
from PIL import Image

from app import pipeline
from app.config import compose_config
from app.model import ModelSpec, build_model

MODELS = ("fasterrcnn_mobilenet_v3_large_320_fpn", "fasterrcnn_resnet50_fpn_v2")
# Input counts per model for the throughput runs (the smaller, the larger): the heavy model is ~100x slower.
DEFAULT_COUNTS = {"fasterrcnn_mobilenet_v3_large_320_fpn": (40, 200), "fasterrcnn_resnet50_fpn_v2": (8, 16)}
MODES = ("bare", "app", "tutorial")
SAMPLE_INTERVAL_S = 0.5

log = logging.getLogger("app.bench")


# ---------------------------------------------------------------------------------------------- inputs


def write_jpegs(folder: Path, count: int, width: int, height: int, seed: int = 0) -> list[Path]:
    """`count` distinct photo-like JPEGs (smooth colour fields, shapes, sensor noise) of width x height."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    paths = []
    for i in range(count):
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
        write_jpegs(pool, count, args.width, args.height, seed=args.seed)
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


@dataclass
class Timing:
    mode: str
    images: int
    seconds: float  # from the start of the mode (Ray start included) to the last result
    first_result_s: Optional[float]  # from the start of the mode to the first result row on the driver
    peak_rss_mb: float  # summed over the processes
    peak_driver_rss_mb: float  # this process alone
    detections: int


def model_overrides(model: str, args) -> list[str]:
    overrides = [f"model={model}", "model.weights=none", f"model.score_threshold={args.score_threshold}"]
    if args.batch_size:
        overrides.append(f"inference.batch_size={args.batch_size}")
    return overrides


def run_bare(folder: Path, cfg, out: Path) -> tuple[int, Optional[float]]:
    """Decode and forward in one loop in this process, torch threads = every core."""
    torch.set_num_threads(os.cpu_count() or 1)
    started = time.monotonic()
    model, _ = build_model(pipeline.model_spec(cfg))
    paths = sorted(folder.iterdir())
    batch_size, detections, first = cfg.inference.batch_size, 0, None
    with torch.inference_mode():
        for start in range(0, len(paths), batch_size):
            tensors = []
            for path in paths[start : start + batch_size]:
                with Image.open(path) as image:
                    pixels = np.array(image.convert("RGB"))
                tensors.append(torch.from_numpy(pixels).permute(2, 0, 1).float().div_(255.0))
            outputs = model(tensors)
            detections += sum(len(output["labels"]) for output in outputs)
            first = first if first is not None else time.monotonic() - started
    return detections, first


def run_app(folder: Path, cfg, out: Path) -> tuple[int, Optional[float]]:
    """app.pipeline.run() as `python -m app` runs it: a local Ray started by the app, default settings.
    ResultWriter is wrapped only to note when the first rows reach the driver."""
    started = time.monotonic()
    first: list[float] = []

    class TimedWriter(pipeline.ResultWriter):
        def add(self, rows):
            if not first:
                first.append(time.monotonic() - started)
            super().add(rows)

    original = pipeline.ResultWriter
    pipeline.ResultWriter = TimedWriter
    try:
        from omegaconf import OmegaConf

        OmegaConf.update(cfg, "data.path", str(folder))
        OmegaConf.update(cfg, "output.path", str(out))
        summary = pipeline.run(cfg)
    finally:
        pipeline.ResultWriter = original
        ray.shutdown()
    return summary.detections, first[0] if first else None


class TutorialModel:
    """The tutorial's model class: built once per actor, called on batches of float CHW arrays."""

    def __init__(self, spec: ModelSpec):
        self.model, _ = build_model(spec)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        inputs = [torch.from_numpy(image) for image in batch["image"]]
        with torch.inference_mode():
            outputs = self.model(inputs)
        return {"num_detections": np.array([len(output["labels"]) for output in outputs])}


def run_tutorial(folder: Path, cfg, out: Path) -> tuple[int, Optional[float]]:
    """read_images -> map(ToTensor + weights.transforms()) -> map_batches(model class, actor pool of 1),
    with Ray's defaults for everything else (one CPU per actor, so torch runs one thread)."""
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
            batch_size=cfg.inference.batch_size,
        )
        detections, first = 0, None
        for batch in detected.iter_batches(batch_size=None):
            detections += int(batch["num_detections"].sum())
            first = first if first is not None else time.monotonic() - started
    finally:
        ray.shutdown()
    return detections, first


RUNNERS: dict[str, Callable] = {"bare": run_bare, "app": run_app, "tutorial": run_tutorial}


def timed(mode: str, folder: Path, cfg, out: Path, images: int) -> Timing:
    with PeakMemory() as memory:
        started = time.monotonic()
        detections, first = RUNNERS[mode](folder, cfg, out)
        seconds = time.monotonic() - started
    timing = Timing(mode, images, round(seconds, 3), round(first, 3) if first is not None else None,
                    round(memory.peak_bytes / 2**20, 1), round(memory.peak_driver_bytes / 2**20, 1), detections)
    log.info("%-8s %5d images in %8.2f s (first result after %s s), peak RSS %.0f MB, %d detections",
             mode, images, seconds, timing.first_result_s, timing.peak_rss_mb, detections)
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
    """One forward pass in this process first, so the bare loop's first run does not pay for torch's
    one-time initialisation that its second run would not (Ray's workers are fresh processes each time)."""
    model, _ = build_model(pipeline.model_spec(cfg))
    with torch.inference_mode():
        model([torch.rand(3, 64, 64)])


def throughput(args, base: Path) -> dict:
    results = {}
    for model in args.models:
        counts = tuple(args.counts) if args.counts else DEFAULT_COUNTS.get(model, (8, 24))
        cfg_overrides = model_overrides(model, args)
        warm_up(compose_config(cfg_overrides))
        folders = {count: input_folder(base, f"{model}-{count}", count, args) for count in counts}
        timings = {mode: [] for mode in args.modes}
        # Interleaved, so that a slow spell of the machine does not land on one mode only.
        for count in counts:
            for mode in args.modes:
                out = Path(tempfile.mkdtemp(dir=base, prefix=f"out-{mode}-"))
                timings[mode].append(timed(mode, folders[count], compose_config(cfg_overrides), out, count))
                shutil.rmtree(out, ignore_errors=True)
                time.sleep(args.pause)  # the previous run's processes exit before the next starts
        summary = {mode: marginal(*runs) for mode, runs in timings.items()}
        rates = {mode: result["marginal_images_per_s"] for mode, result in summary.items()}
        ratios = {
            f"app_over_{other}": round(rates["app"] / rates[other], 3) if rates["app"] and rates[other] else None
            for other in ("bare", "tutorial")
            if "app" in rates and other in rates
        }
        results[model] = {
            "counts": list(counts),
            "batch_size": compose_config(cfg_overrides).inference.batch_size,
            "modes": summary,
            "ratios": ratios,
            "runs": [asdict(t) for runs in timings.values() for t in runs],
        }
    return results


def memory(args, base: Path) -> dict:
    model = args.memory_model
    cfg_overrides = model_overrides(model, args)
    runs = []
    for count in args.memory_counts:
        folder = input_folder(base, f"memory-{count}", count, args)
        out = Path(tempfile.mkdtemp(dir=base, prefix="out-memory-"))
        runs.append(timed("app", folder, compose_config(cfg_overrides), out, count))
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(folder, ignore_errors=True)
    small, large = runs[0], runs[-1]
    return {
        "model": model,
        "runs": [asdict(run) for run in runs],
        "peak_ratio": round(large.peak_rss_mb / small.peak_rss_mb, 3),
    }


def listing(args, base: Path) -> dict:
    """Time app.pipeline.run() from its start to the moment the plan is built and execution would
    begin (it is stopped there), over `--listing-files` tiny files. Ray is started beforehand, since
    its start-up is reported by the throughput runs."""
    folder = base / "listing"
    for start in range(0, args.listing_files, 1000):
        sub = folder / f"d{start // 1000:04d}"
        sub.mkdir(parents=True)
        for i in range(start, min(start + 1000, args.listing_files)):
            (sub / f"f{i:07d}.jpg").write_bytes(b"\xff\xd8\xff")

    class PlanBuilt(Exception):
        pass

    class StopWriter:
        def __init__(self, *a, **k):
            raise PlanBuilt

    if not ray.is_initialized():
        ray.init(log_to_driver=False, include_dashboard=False)
    original = pipeline.ResultWriter
    pipeline.ResultWriter = StopWriter
    cfg = compose_config([*model_overrides(args.memory_model, args), f"data.path={folder}", f"output.path={base / 'listing-out'}"])
    try:
        started = time.monotonic()
        try:
            pipeline.run(cfg)
        except PlanBuilt:
            pass
        seconds = time.monotonic() - started
    finally:
        pipeline.ResultWriter = original
        ray.shutdown()
    shutil.rmtree(folder, ignore_errors=True)
    log.info("listing and planning %d files: %.2f s", args.listing_files, seconds)
    return {"files": args.listing_files, "seconds": round(seconds, 2)}


# ---------------------------------------------------------------------------------------------- report


def machine() -> dict:
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


def report(results: dict) -> str:
    lines = []
    info = results["machine"]
    lines.append(f"machine: {info['cpus']} CPUs ({info['cpu_model']}), {info['memory_gb']} GB, "
                 f"load average at start {info['load_average_at_start'][0]}")
    for model, result in results.get("throughput", {}).items():
        lines.append(f"{model}, batch {result['batch_size']}, runs of {' and '.join(map(str, result['counts']))} images:")
        lines.append(f"  {'mode':<9} {'marginal img/s':>14} {'start-up s':>10} {'first result s':>14} {'peak RSS MB':>11} {'det/img':>7}")
        for mode, m in result["modes"].items():
            lines.append(f"  {mode:<9} {number(m['marginal_images_per_s'], 14, 3)} {number(m['startup_s'], 10, 1)} "
                         f"{number(m['first_result_s'], 14, 1)} {number(m['peak_rss_mb'], 11, 0)} "
                         f"{number(m['detections_per_image'], 7, 1)}")
        ratios = ", ".join(f"{name.replace('_over_', '/')} = {number(value, 0, 2)}" for name, value in result["ratios"].items())
        lines.append(f"  marginal ratios: {ratios}")
    if "memory" in results:
        mem = results["memory"]
        runs = ", ".join(f"{r['images']} images: {r['peak_rss_mb']:.0f} MB in {r['seconds']:.0f} s" for r in mem["runs"])
        lines.append(f"memory ({mem['model']}, app): peak RSS {runs}; ratio {mem['peak_ratio']:.2f}")
    if "listing" in results:
        lst = results["listing"]
        lines.append(f"listing and planning {lst['files']} files: {lst['seconds']:.1f} s")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m app.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("suites", nargs="*", metavar="SUITE", help="throughput (default), memory, listing or all")
    parser.add_argument("--models", nargs="+", default=list(MODELS), help="torchvision model names")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--counts", nargs=2, type=int, help="the two input counts (default: per model)")
    parser.add_argument("--width", type=int, default=500, help="width of generated images")
    parser.add_argument("--height", type=int, default=375, help="height of generated images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--images", help="a folder of JPEG/PNG images to use instead of generated ones")
    parser.add_argument("--batch-size", type=int, help="inference.batch_size (default: the app's)")
    parser.add_argument("--score-threshold", type=float, default=0.5,
                        help="model.score_threshold, the same in every mode (default: the app's 0.5)")
    parser.add_argument("--memory-model", default="fasterrcnn_mobilenet_v3_large_320_fpn")
    parser.add_argument("--memory-counts", nargs=2, type=int, default=[500, 5000])
    parser.add_argument("--listing-files", type=int, default=100_000)
    parser.add_argument("--pause", type=float, default=5.0, help="seconds between runs")
    parser.add_argument("--workdir", help="where inputs and outputs go (default: a temporary folder)")
    parser.add_argument("--out", default="benchmarks/results.json", help="JSON result file")
    args = parser.parse_args(argv)
    args.suites = args.suites or ["throughput"]
    unknown = set(args.suites) - {"throughput", "memory", "listing", "all"}
    if unknown:
        parser.error(f"unknown suite {', '.join(sorted(unknown))}: choose throughput, memory, listing or all")
    if args.counts and args.counts[0] >= args.counts[1]:
        parser.error("--counts: the second count must be larger")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("app").setLevel(logging.WARNING)  # the app's own progress lines
    logging.getLogger("app.bench").setLevel(logging.INFO)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    base = Path(args.workdir or tempfile.mkdtemp(prefix="ray-detect-bench-"))
    base.mkdir(parents=True, exist_ok=True)
    results = {"machine": machine(), "command": "python -m app.bench " + " ".join(argv or [])}
    try:
        suites = {"throughput", "memory", "listing"} if "all" in args.suites else set(args.suites)
        if "throughput" in suites:
            results["throughput"] = throughput(args, base)
        if "memory" in suites:
            results["memory"] = memory(args, base)
        if "listing" in suites:
            results["listing"] = listing(args, base)
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
    import sys

    main(sys.argv[1:])
