"""The benchmark's shared harness: generated inputs, the peak-memory sampler, timings with the arrival times of
results, the rate after warm-up and the marginal rate, the model as the modes without the app load it, the app's run as every suite times it, and the report's
machine description and number format."""

import concurrent.futures
import contextlib
import logging
import multiprocessing
import os
import platform
import threading
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import numpy as np
import ray
import torch
from omegaconf import OmegaConf
from PIL import Image

from app import pipeline
from app.detector import Detector
from app.model import build_model
from app.plan import DEFAULT_BATCH_SIZES
from app.precision import AUTOCAST_DTYPES, mixed_precision

log = logging.getLogger(__name__)


DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


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


SAMPLE_INTERVAL_S = 0.5


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


@dataclass
class Timing:
    mode: str
    images: int
    seconds: float  # from the start of the mode (Ray start included) to the last result
    first_result_s: Optional[float]  # from the start of the mode to the first result row on the driver
    peak_rss_mb: float  # summed over the processes
    peak_driver_rss_mb: float  # this process alone
    detections: int
    # [seconds, images] as results reached the driver, on the mode's own clock; only differences count.
    arrivals: list[list] = field(default_factory=list)
    # The app's: the share of its model calls' time its devices were busy (app.summary.Summary), where known.
    device_busy_share: Optional[float] = None


class Run(NamedTuple):
    """What a mode reports: detections, seconds to its first result, for the modes that prepare their
    inputs before the clock starts the seconds timed (else the whole call is), and the arrivals:
    (seconds, images) each time results reached the driver (a batch, a block, a table of rows)."""

    detections: int
    first_result_s: Optional[float]
    timed_s: Optional[float] = None
    arrivals: tuple = ()
    device_busy_share: Optional[float] = None


class Arrivals:
    """The arrival times of results on the driver: call add(images) as each batch of results arrives."""

    def __init__(self):
        self.started = time.monotonic()
        self.times: list[tuple[float, int]] = []

    def add(self, images: int) -> None:
        self.times.append((time.monotonic() - self.started, images))

    @property
    def first_s(self) -> Optional[float]:
        return self.times[0][0] if self.times else None


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


def run_app(folder: Path, cfg, out: Path, batch_size: int, detector: type[Detector] = Detector, keep_ray: bool = False) -> Run:
    """app.pipeline.run() as `python -m app` runs it: a local Ray started by the app, default settings,
    shut down after the run (unless keep_ray: a Ray the caller started, for its next run too).
    The time to the first result is when the first result rows reach the job's writer."""
    arrivals = Arrivals()
    OmegaConf.update(cfg, "data.path", str(folder))
    OmegaConf.update(cfg, "output.path", str(out))
    try:
        summary = pipeline.run(cfg, detector=detector, on_rows=lambda rows: arrivals.add(rows.num_rows))
    finally:
        if not keep_ray:
            ray.shutdown()
    return Run(summary.detections, arrivals.first_s, arrivals=tuple(arrivals.times), device_busy_share=summary.device_busy_share)


def timed(mode: str, run: Callable[[], Run], images: int) -> Timing:
    with PeakMemory() as memory:
        started = time.monotonic()
        result = run()
        seconds = result.timed_s if result.timed_s is not None else time.monotonic() - started
    first = result.first_result_s
    timing = Timing(mode, images, round(seconds, 3), round(first, 4) if first is not None else None,
                    round(memory.peak_bytes / 2**20, 1), round(memory.peak_driver_bytes / 2**20, 1), result.detections,
                    [[round(at, 4), count] for at, count in result.arrivals], result.device_busy_share)
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


def rate_after_warm_up(arrivals: list[list], warm_up_images: int) -> Optional[float]:
    """Images per second at the driver once warm: from the arrival that completes the first
    `warm_up_images` images (at least the first arrival) to the last arrival, counting the images that
    arrived after it. Start-up (Ray, actors, model build, a first forward) and the pipeline filling up fall
    before that arrival, so they cancel within one run. None when no image arrives after it."""
    arrived = 0
    for index, (_, images) in enumerate(arrivals):
        arrived += images
        if arrived >= max(warm_up_images, 1):
            break
    else:
        return None
    counted = sum(images for _, images in arrivals[index + 1 :])
    seconds = arrivals[-1][0] - arrivals[index][0]
    return round(counted / seconds, 4) if counted and seconds > 0 else None


def spread(values: list[Optional[float]], decimals: int = 4) -> dict:
    """The median and the range of repeated figures, over those that have a value (a run too short to
    time has none); None for all three when none has."""
    known = [value for value in values if value is not None]
    if not known:
        return {"median": None, "min": None, "max": None}
    return {"median": round(statistics.median(known), decimals), "min": min(known), "max": max(known)}


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
