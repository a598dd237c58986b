"""The benchmark's stand-in suite (`ray-detect bench standin`): the app with a device stand-in in place of
the model (it holds --stand-in-ms per image with
the GIL released, as a CUDA call does, and returns 5 boxes per image), on one actor planned
like a GPU actor, against the stand-in's own rate; and the detector's host time per image
with a zero-time stand-in. Measures the overlap of decoding, host work and device time on a
machine without a GPU. The stand-in can also be host-bound (app.bench.actors).
"""

import contextlib
import fcntl
import functools
import os
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import torch

from app.bench.harness import input_folder, marginal, model_overrides, number, run_app, timed
from app.config import compose_config
from app.decode import DECODED_SCHEMA
from app.detector import Detector
from app.detector_stage import DetectorStage
from app.model import ModelSpec, coco_categories


STAND_IN_DETECTIONS = 5


class StandInModel(torch.nn.Module):
    """Stands in for a model on an accelerator. Each batch first computes on the host for
    `host_seconds_per_image` of its thread's CPU time per image with the GIL held, as the Python thread
    that launches a model's kernels and loops over its images does (a host-bound model; on a busy machine
    it takes longer, as that thread would); then holds the device for
    `seconds_per_image` per image with the GIL released, as a CUDA call does while the device works. The
    actors Ray gave the same GPU take the device in turns (shared_device_lock), as kernels on one GPU run
    one after another, and add the seconds they held it to the device's busy seconds (busy_seconds: those of
    every actor sharing it, as NVML's utilisation counts a GPU's kernels whichever process launched them).
    Returns STAND_IN_DETECTIONS boxes per image, spread over it."""

    def __init__(self, seconds_per_image: float, host_seconds_per_image: float = 0.0):
        super().__init__()
        self.seconds_per_image = seconds_per_image
        self.host_seconds_per_image = host_seconds_per_image
        self.device_lock = shared_device_lock()
        self.own_busy_seconds = 0.0  # without a shared device

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        busy_until = time.thread_time() + self.host_seconds_per_image * len(images)
        while time.thread_time() < busy_until:
            pass
        if self.seconds_per_image:
            with self.device():
                time.sleep(self.seconds_per_image * len(images))
        steps = torch.arange(STAND_IN_DETECTIONS, dtype=torch.float32) / STAND_IN_DETECTIONS
        outputs = []
        for image in images:
            height, width = image.shape[-2:]
            corners = torch.stack([steps * width, steps * height, (steps + 0.2) * width, (steps + 0.2) * height], dim=1)
            outputs.append({"boxes": corners, "scores": 1 - steps / 2, "labels": torch.arange(1, STAND_IN_DETECTIONS + 1)})
        return outputs

    @contextlib.contextmanager
    def device(self):
        """The stand-in device, held: an exclusive lock on its lock file when actors share it. The seconds
        it was held are added to its busy seconds before it is let go."""
        if self.device_lock is None:
            started = time.perf_counter()
            yield
            self.own_busy_seconds += time.perf_counter() - started
            return
        with open(self.device_lock, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                started = time.perf_counter()
                yield
                self.write_busy_seconds(self.busy_seconds() + time.perf_counter() - started)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def busy_seconds(self) -> float:
        """The seconds the stand-in device was held so far, by every actor sharing it. Read without the lock
        (a reader would wait for the device otherwise): the file is replaced whole, never written in place."""
        if self.device_lock is None:
            return self.own_busy_seconds
        try:
            with open(self.device_lock + ".busy") as file:
                return float(file.read())
        except FileNotFoundError:
            return 0.0

    def write_busy_seconds(self, seconds: float) -> None:
        partial = f"{self.device_lock}.busy.{os.getpid()}"
        with open(partial, "w") as file:
            file.write(repr(seconds))
        os.replace(partial, self.device_lock + ".busy")


def shared_device_lock() -> Optional[str]:
    """The lock file of the GPU Ray gave this actor, one per node and GPU (nodes of a test cluster share a
    file system); None outside a Ray actor given a GPU."""
    if not ray.is_initialized() or not ray.get_gpu_ids():
        return None
    gpus = "-".join(str(gpu) for gpu in ray.get_gpu_ids())
    return os.path.join(tempfile.gettempdir(), f"ray-detect-stand-in-{ray.get_runtime_context().get_node_id()}-gpu{gpus}.lock")


def stand_in_detector(seconds_per_image: float, host_seconds_per_image: float = 0.0) -> type[Detector]:
    """The app's Detector with the stand-in in place of the model."""

    class StandInDetector(Detector):
        def load_model(self, spec: ModelSpec):
            return StandInModel(seconds_per_image, host_seconds_per_image), coco_categories(spec.name)

        def device_busy_reading(self) -> tuple[float, float]:
            return time.perf_counter(), self.model.busy_seconds()

        def device_busy_share(self, reading: tuple[float, float]) -> Optional[float]:
            """The share of the call's time the stand-in device was held, by this actor or one sharing it."""
            started, busy = reading
            seconds = time.perf_counter() - started
            return min(1.0, (self.model.busy_seconds() - busy) / seconds) if seconds > 0 else None

    return StandInDetector


def detector_host_time(batches: int, images_per_batch: int, size=(1066, 800)) -> dict:
    """The detector stage's own time per image with a zero-time stand-in: everything it does around the
    model (pixel views, grouping, staging, results to rows) on decoded 800-px images."""
    spec = ModelSpec("fasterrcnn_resnet50_fpn_v2", "none", 0.5, 800, 1333)
    detector = DetectorStage(spec, detector=stand_in_detector(0.0), num_threads=1, batch_size=8)
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


def run(args, base: Path) -> dict:
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
        app_run = functools.partial(run_app, folder, compose_config(overrides), out, 8, detector)
        runs.append(timed("app", app_run, count))
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


def lines(standin: dict) -> list[str]:
    app, host = standin["app"], standin["host_time"]
    return [
        f"device stand-in at {standin['ms_per_image']} ms/image ({1000 / standin['ms_per_image']:.1f} images/s), "
        f"app with one actor, runs of {' and '.join(map(str, standin['counts']))} images: "
        f"{number(app['marginal_images_per_s'], 0, 2)} images/s marginal, ratio {number(standin['ratio'], 0, 3)}",
        f"detector host time, zero-time stand-in, {host['image_size'][0]}x{host['image_size'][1]} images with "
        f"{host['detections_per_image']} detections: {host['ms_per_image']:.3f} ms/image",
    ]
