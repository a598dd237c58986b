"""The benchmark's video suite (`ray-detect bench video`): frames a second through the app against Ray
Data's `read_videos` feeding the same detector in `map_batches` at its best batch size, and the wall time
of one long video against many short ones of the same frames.

The videos are generated: H.264 at 30 fps with a key frame every 2 s, a textured background that pans
(so that frames cost what camera footage costs to decode) under a few moving boxes, in several lengths,
sizes and orientations. Both pipelines detect `--video-fps` frames a second of video with the
device stand-in (app.bench.standin: --video-stand-in-ms per frame, the GIL released: 2 ms, about what a
GPU takes for a frame of the default model in a batch) on a local Ray that
advertises one GPU (the detector on it, as on a GPU node), so that the comparison is of what each does
around the device: reading, decoding and spreading the work over the CPUs. `read_videos` decodes a
whole file in one task; the app cuts a video into segments of data.video.segment_s seconds (--segment-s,
the app's default otherwise) decoded in parallel.
"""

import functools
import shutil
import time
from dataclasses import asdict
from fractions import Fraction
from pathlib import Path
from typing import Optional

import numpy as np
import ray

from app.bench.harness import Arrivals, Timing, model_overrides, number, rate_after_warm_up, run_app, spread, timed
from app.bench.standin import stand_in_detector
from app.config import compose_config
from app.decode import model_input_size
from app.pipeline import model_spec

MODEL = "fasterrcnn_mobilenet_v3_large_320_fpn"
RATE, GOP_S = 30, 2
# (width, height, seconds) of the mixed set: landscape and portrait, 270p to 720p.
MIXED = [(640, 360, 60), (1280, 720, 30), (360, 640, 45), (480, 270, 90), (854, 480, 40)]
# One long video, and the same frames as short ones.
LONG_S, SHORT_S, SIZE = 240, 10, (1280, 720)
BASELINE_BATCH_SIZES = (1, 4, 16)
# CPUs of the local Ray: the detector actor's and the input stage's are mostly idle (the stand-in waits
# with the GIL released, as for a GPU), so four on a 2-core machine let two decode or read tasks use the
# two cores, as decode tasks use a GPU node's CPUs beside its actors.
RAY_CPUS = 4
# The share of a run's frames taken as its warm-up.
WARM_UP = 0.2


def write_video(path: Path, width: int, height: int, seconds: int, seed: int) -> None:
    """An H.264 video at RATE fps with a key frame every GOP_S seconds."""
    import av

    rng = np.random.default_rng(seed)
    texture = rng.integers(0, 256, (height, width * 2, 3), dtype=np.uint8)
    texture = ((texture.astype(np.uint16) + np.roll(texture, 1, axis=1) + np.roll(texture, 1, axis=0)) // 3).astype(np.uint8)
    boxes = rng.integers(0, [width // 2, height // 2, 4, 4], (4, 4))
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=RATE)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"keyint": str(RATE * GOP_S), "min-keyint": str(RATE * GOP_S), "scenecut": "0", "preset": "veryfast"}
        stream.codec_context.time_base = Fraction(1, RATE)
        for index in range(seconds * RATE):
            shift = index % width
            pixels = np.ascontiguousarray(texture[:, shift : shift + width])
            for x, y, dx, dy in boxes:
                left, top = (x + dx * index) % (width - width // 6), (y + dy * index) % (height - height // 6)
                pixels[top : top + height // 6, left : left + width // 6] = (240, 200, 30)
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            frame.pts = index
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def video_sets(base: Path, seed: int) -> dict[str, Path]:
    """The three sets of videos, each a folder, generated once under base."""
    sets = {
        "mixed": [(f"mixed/{width}x{height}-{seconds}s.mp4", width, height, seconds) for width, height, seconds in MIXED],
        "long": [(f"long/{SIZE[0]}x{SIZE[1]}-{LONG_S}s.mp4", *SIZE, LONG_S)],
        "short": [(f"short/{SIZE[0]}x{SIZE[1]}-{SHORT_S}s-{i:02d}.mp4", *SIZE, SHORT_S) for i in range(LONG_S // SHORT_S)],
    }
    for offset, (name, width, height, seconds) in enumerate(item for items in sets.values() for item in items):
        path = base / "videos" / name
        if not path.exists():
            write_video(path, width, height, seconds, seed + offset)
    return {name: base / "videos" / name for name in sets}


class BaselineDetector:
    """Ray's pattern: a class UDF that builds the detector once and detects each batch of frames, resized
    to the model's input size first (as the app's decode tasks resize them)."""

    def __init__(self, detector: type, spec, batch_size: int):
        self.detector = detector(spec, num_threads=1, batch_size=batch_size, cpu_fallback=True)
        self.spec = spec

    def __call__(self, batch: dict) -> dict:
        from PIL import Image

        frames = []
        for frame in batch["frame"]:
            height, width = frame.shape[:2]
            size = model_input_size(width, height, self.spec.min_size, self.spec.max_size)
            frames.append(np.asarray(Image.fromarray(frame).resize(size, Image.Resampling.BILINEAR)))
        found, _ = self.detector.detect_batches(frames)
        return {"path": batch["path"], "frame_index": batch["frame_index"],
                "num_detections": np.array([len(result["labels"]) for result in found])}


def baseline(folder: Path, fps: int, batch_size: int, detector: type, spec) -> Arrivals:
    """read_videos at `fps` into the detector in map_batches; the frames' arrivals at the driver."""
    frames = ray.data.read_videos(str(folder), fps=fps, include_paths=True).map_batches(
        BaselineDetector, fn_constructor_kwargs=dict(detector=detector, spec=spec, batch_size=batch_size),
        batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=1), num_gpus=1)
    arrivals = Arrivals()
    for batch in frames.iter_batches(batch_size=None):
        arrivals.add(len(batch["frame_index"]))
    return arrivals


def run(args, base: Path) -> dict:
    sets = video_sets(base, args.seed)
    detector = stand_in_detector(args.video_stand_in_ms / 1000)
    overrides = [*model_overrides(MODEL, args), "inference.cpu_fallback=true", f"data.video.fps={args.video_fps}",
                 *([f"data.video.segment_s={args.segment_s}"] if args.segment_s else [])]
    spec = model_spec(compose_config([*overrides, "data.path=."]))
    app_batch = args.batch_size or 4
    timings: dict[str, list[Timing]] = {}
    ray.init(address="local", num_cpus=RAY_CPUS, num_gpus=1, include_dashboard=False, log_to_driver=False)
    try:
        for repeat in range(args.repeats):
            for name, folder in sets.items():
                cfg = compose_config([*overrides, f"inference.batch_size={app_batch}"])
                out = base / f"out-video-{name}-{repeat}"
                shutil.rmtree(out, ignore_errors=True)
                timings.setdefault(f"app {name}", []).append(
                    timed(f"app {name}", functools.partial(run_app, folder, cfg, out, app_batch, detector, keep_ray=True), 0))
                batches = BASELINE_BATCH_SIZES if name == "mixed" else (best_batch_size(timings),)
                for batch_size in batches:
                    started = time.monotonic()
                    arrivals = baseline(folder, args.video_fps, batch_size, detector, spec)
                    mode = f"read_videos {name} batch {batch_size}"
                    timings.setdefault(mode, []).append(Timing(
                        mode, sum(count for _, count in arrivals.times), round(time.monotonic() - started, 3), arrivals.first_s,
                        0.0, 0.0, 0, [[round(at, 4), count] for at, count in arrivals.times]))
                time.sleep(args.pause)
    finally:
        ray.shutdown()
    return results(args, timings)


def best_batch_size(timings: dict[str, list[Timing]]) -> int:
    """The baseline's batch size of the highest median rate on the mixed set, once warm."""
    return max(BASELINE_BATCH_SIZES, key=lambda size: np.median([warm_rate(t) or 0.0 for t in timings[f"read_videos mixed batch {size}"]]))


def warm_rate(timing: Timing) -> Optional[float]:
    """Frames a second at the driver once WARM_UP of them arrived (start-up and the pipeline filling up left out)."""
    return rate_after_warm_up(timing.arrivals, round(WARM_UP * frames_of(timing)))


def results(args, timings: dict[str, list[Timing]]) -> dict:
    best = best_batch_size(timings)
    names = ("mixed", "long", "short")
    app = {name: timings[f"app {name}"] for name in names}
    read_videos = {name: timings[f"read_videos {name} batch {best}"] for name in names}
    app_rates = {name: [warm_rate(timing) for timing in app[name]] for name in names}
    base_rates = {name: [warm_rate(timing) for timing in read_videos[name]] for name in names}
    return {
        "video_fps": args.video_fps,
        "device_ms": args.video_stand_in_ms,
        "segment_s": args.segment_s,
        "baseline_batch_size": best,
        "frames": {name: frames_of(app[name][0]) for name in names},
        "app_frames_per_s": {name: spread(values, 2) for name, values in app_rates.items()},
        "read_videos_frames_per_s": {name: spread(values, 2) for name, values in base_rates.items()},
        "app_over_read_videos": {name: spread([a / b if a and b else None for a, b in zip(app_rates[name], base_rates[name])], 3)
                                 for name in names},
        # Whole runs, start-up included: one long video against the same frames as short ones.
        "seconds": {pipeline: {name: spread([timing.seconds for timing in runs[name]], 2) for name in names}
                    for pipeline, runs in (("app", app), ("read_videos", read_videos))},
        "long_over_short_seconds": {
            pipeline: spread([long.seconds / short.seconds for long, short in zip(runs["long"], runs["short"])], 3)
            for pipeline, runs in (("app", app), ("read_videos", read_videos))
        },
        "runs": {key: [asdict(timing) for timing in values] for key, values in timings.items()},
    }


def frames_of(timing: Timing) -> int:
    """The frames a run detected: the rows that reached its driver."""
    return sum(count for _, count in timing.arrivals)


def lines(video: dict) -> list[str]:
    fps, base, ratio, seconds = video["app_frames_per_s"], video["read_videos_frames_per_s"], video["app_over_read_videos"], video["seconds"]
    out = [f"video at {video['video_fps']} frames/s of video, stand-in device {video['device_ms']} ms/frame, "
           f"read_videos at its best batch size {video['baseline_batch_size']}; frames/s once warm, and whole runs:"]
    for name in ("mixed", "long", "short"):
        out.append(f"  {name:5s} ({video['frames'][name]} frames): app {number(fps[name]['median'], 0, 1)} frames/s, "
                   f"read_videos {number(base[name]['median'], 0, 1)}, ratio {number(ratio[name]['median'], 0, 2)} "
                   f"({number(ratio[name]['min'], 0, 2)}-{number(ratio[name]['max'], 0, 2)}); "
                   f"{number(seconds['app'][name]['median'], 0, 1)} s against {number(seconds['read_videos'][name]['median'], 0, 1)} s")
    long_short = video["long_over_short_seconds"]
    out.append(f"  one {LONG_S}-s video against {LONG_S // SHORT_S} of {SHORT_S} s, wall time long/short: app "
               f"{number(long_short['app']['median'], 0, 2)}, read_videos {number(long_short['read_videos']['median'], 0, 2)}")
    return out
