"""The benchmark's tiles suite (`ray-detect bench tiles`): tiled detection of large generated scenes by
the app against SAHI's get_sliced_prediction loop, on the same scenes, model and settings.

Scenes: aerial-like (a textured ground strewn with objects of 8 to 40 pixels), landscape and portrait,
12 and 24 MP JPEGs by default. Settings: tiles of the model's input size with 0.2 overlap, SAHI's merge
(greedy NMM, IoS 0.5, per label), no whole-image pass; the model's random weights score every box alike,
so score threshold 0 with 3 detections per tile gives each tile a few detections to merge. Modes:
  sahi@N  SAHI's get_sliced_prediction over the files in a loop in this process, torch on every core,
          at its batch_size N (1, its default, and 8; the best stands for "sahi");
  app     app.pipeline.run() with tiling=tiles on a local Ray, its defaults otherwise.
Each runs at two scene counts; the marginal rate (extra scenes / extra seconds) cancels start-up.
Then the app with the device stand-in (app.bench.standin.StandInModel, --stand-in-ms per tile) on one actor
planned like a GPU actor: the stand-in's busy fraction is tiles x ms per tile / marginal seconds.
"""

import functools
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from app.bench.harness import Run, marginal, run_app, timed
from app.bench.standin import stand_in_detector
from app.config import compose_config
from app.model import build_model
from app.pipeline import model_spec
from app.tiling import tile_grid

log = logging.getLogger(__name__)

# 12 MP landscape, 12 MP portrait, 24 MP landscape: the scenes cycle through them.
SCENE_SIZES = ((4000, 3000), (3000, 4000), (6000, 4000))
SAHI_BATCH_SIZES = (1, 8)
OVERLAP = 0.2


def scene_pixels(width: int, height: int, seed: int) -> np.ndarray:
    """A large generated scene as HWC uint8: a soft gradient with noise, strewn with small objects
    (rectangles and discs of 8 to 40 pixels, one per 4,000 pixels), as aerial views are."""
    rng = np.random.default_rng(seed)
    y, x = np.ogrid[0:height, 0:width]
    pixels = np.empty((height, width, 3), np.uint8)
    pixels[..., 0] = x * 200 // width
    pixels[..., 1] = y * 200 // height
    pixels[..., 2] = (x + y) * 100 // (width + height) + 50
    pixels += rng.integers(0, 30, (height, width, 3), dtype=np.uint8)
    for _ in range(width * height // 4000):
        size = int(rng.integers(8, 40))
        left, top = int(rng.integers(0, width - size)), int(rng.integers(0, height - size))
        patch = pixels[top : top + size, left : left + size]
        if rng.random() < 0.5:
            patch[:] = rng.integers(0, 256, 3)
        else:
            across, down = np.ogrid[0:size, 0:size]
            patch[(across - size / 2) ** 2 + (down - size / 2) ** 2 < (size / 2) ** 2] = rng.integers(0, 256, 3)
    return pixels


def write_scenes(folder: Path, count: int, sizes=SCENE_SIZES, seed: int = 0) -> list[Path]:
    """`count` scenes as JPEGs, the i-th of sizes[i % len(sizes)]."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"scene_{i:04d}.jpg"
        Image.fromarray(scene_pixels(*sizes[i % len(sizes)], seed=seed + i)).save(path, quality=90)
        paths.append(path)
    return paths


def tile_count(paths: list[Path], tile_size: int) -> int:
    total = 0
    for path in paths:
        with Image.open(path) as image:
            total += len(tile_grid(*image.size, tile_size, OVERLAP))
    return total


def overrides(model: str) -> list[str]:
    return [f"model={model}", "model.weights=none", "model.score_threshold=0", "model.max_detections=3", "tiling=tiles",
            "tiling.full_image=false", f"tiling.overlap={OVERLAP}"]


def sahi_model(model: torch.nn.Module, confidence_threshold: float, device: str):
    """SAHI's wrapper of a torchvision model. Picking its device, SAHI sets CUDA_VISIBLE_DEVICES for the
    whole process (-1 for the CPU): the variable is put back, so that what runs after it in this process,
    and the Ray workers it starts, still see the machine's GPUs."""
    from sahi.models.torchvision import TorchVisionDetectionModel

    saved = os.environ.get("CUDA_VISIBLE_DEVICES")
    try:
        return TorchVisionDetectionModel(model=model, confidence_threshold=confidence_threshold, device=device)
    finally:
        if saved is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = saved


def run_sahi(folder: Path, cfg, out: Path, batch_size: int) -> Run:
    """SAHI's sliced prediction over the folder's files in a loop, as its users write it: the model
    built once, torch on every core, settings as the app's."""
    from sahi.predict import get_sliced_prediction

    torch.set_num_threads(os.cpu_count() or 1)
    spec = model_spec(cfg)
    model = sahi_model(build_model(spec)[0], spec.score_threshold, "cuda" if torch.cuda.is_available() else "cpu")
    tiling, started, first, detections = cfg.tiling, time.monotonic(), None, 0
    with torch.inference_mode():
        for path in sorted(folder.iterdir()):
            with Image.open(path) as image:
                pixels = np.asarray(image.convert("RGB"))
            result = get_sliced_prediction(
                pixels, model, slice_height=tiling.tile_size, slice_width=tiling.tile_size, overlap_height_ratio=tiling.overlap,
                overlap_width_ratio=tiling.overlap, perform_standard_pred=tiling.full_image, postprocess_type=tiling.merge.value.replace("nmm", "greedynmm").upper(),
                postprocess_match_metric=tiling.match_metric.value.upper(), postprocess_match_threshold=tiling.match_threshold,
                postprocess_class_agnostic=not tiling.class_aware, force_postprocess_type=True, batch_size=batch_size, verbose=0)
            detections += len(result.object_prediction_list)
            first = first if first is not None else time.monotonic() - started
    return Run(detections, first)


def run(args, base: Path) -> dict:
    """The suite: SAHI and the app at two scene counts each, interleaved; then the stand-in run."""
    cfg_overrides = overrides(args.tiles_model)
    tile_size = compose_config(cfg_overrides).tiling.tile_size
    counts = tuple(args.tiles_counts)
    sizes = tuple(args.tiles_sizes or SCENE_SIZES)
    pool = write_scenes(base / "scenes", max(counts), sizes, seed=args.seed)
    folders, tile_counts = {}, {}
    for count in counts:
        folders[count] = base / f"scenes-{count}"
        folders[count].mkdir()
        for path in pool[:count]:
            os.link(path, folders[count] / path.name)
        tile_counts[count] = tile_count(pool[:count], tile_size)
    runners = {**{f"sahi@{size}": functools.partial(run_sahi, batch_size=size) for size in SAHI_BATCH_SIZES},
               "app": functools.partial(run_app, batch_size=0)}
    timings = {mode: [] for mode in runners}
    for count in counts:
        for mode, runner in runners.items():
            out = Path(tempfile.mkdtemp(dir=base, prefix="out-tiles-"))
            timings[mode].append(timed(mode, functools.partial(runner, folders[count], compose_config(cfg_overrides), out), count))
            shutil.rmtree(out, ignore_errors=True)
            time.sleep(args.pause)
    tiles_per_scene = (tile_counts[counts[1]] - tile_counts[counts[0]]) / (counts[1] - counts[0])
    modes = {}
    for mode, runs in timings.items():
        summary = marginal(*runs)
        rate = summary["marginal_images_per_s"]
        modes[mode] = {**summary, "marginal_tiles_per_s": round(rate * tiles_per_scene, 2) if rate else None}
    sahi_best = max((modes[f"sahi@{size}"]["marginal_images_per_s"] or 0 for size in SAHI_BATCH_SIZES), default=0)
    app_rate = modes["app"]["marginal_images_per_s"]
    return {
        "model": args.tiles_model,
        "tile_size": tile_size,
        "overlap": OVERLAP,
        "scene_sizes": [list(size) for size in sizes],
        "counts": list(counts),
        "tiles": [tile_counts[count] for count in counts],
        "tiles_per_scene": round(tiles_per_scene, 1),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "modes": modes,
        "app_over_sahi": round(app_rate / sahi_best, 3) if app_rate and sahi_best else None,
        "runs": [asdict(timing) for runs in timings.values() for timing in runs],
        "standin": stand_in(args, base, folders, counts, tile_counts),
    }


def stand_in(args, base: Path, folders: dict[int, Path], counts: tuple[int, int], tile_counts: dict[int, int]) -> dict:
    """The app with the stand-in at --stand-in-ms per tile on one actor planned like a GPU actor (one
    CPU, batch 8; the other CPUs decode): how busy the scenes' tiles keep it."""
    cfg_overrides = [*overrides(args.tiles_model), "inference.num_actors=1", "inference.num_cpus_per_actor=1", "inference.batch_size=8"]
    detector = stand_in_detector(args.stand_in_ms / 1000)
    runs = []
    for count in counts:
        out = Path(tempfile.mkdtemp(dir=base, prefix="out-tiles-stand-in-"))
        runs.append(timed("app", functools.partial(run_app, folders[count], compose_config(cfg_overrides), out, 8, detector), count))
        shutil.rmtree(out, ignore_errors=True)
        time.sleep(args.pause)
    extra_seconds = runs[1].seconds - runs[0].seconds
    busy = (tile_counts[counts[1]] - tile_counts[counts[0]]) * args.stand_in_ms / 1000 / extra_seconds if extra_seconds > 0 else None
    return {"ms_per_tile": args.stand_in_ms, "app": marginal(*runs), "busy_fraction": round(busy, 3) if busy else None,
            "runs": [asdict(run) for run in runs]}


def lines(result: dict) -> list[str]:
    """The suite's report lines."""
    if not result:
        return []
    modes = result["modes"]
    described = ", ".join(f"{mode} {summary['marginal_images_per_s'] or 0:.3f} scenes/s ({summary['marginal_tiles_per_s'] or 0:.1f} tiles/s)"
                          for mode, summary in modes.items())
    ratio = result["app_over_sahi"]
    standin = result["standin"]
    return [
        f"tiles, {result['model']} on {result['device']}, {result['tiles_per_scene']:.0f} tiles of {result['tile_size']} px a scene: "
        f"{described}; app / best SAHI: {ratio if ratio is not None else 'n/a'}x",
        f"tiles, device stand-in at {standin['ms_per_tile']:g} ms a tile on one actor: busy "
        f"{standin['busy_fraction'] if standin['busy_fraction'] is not None else 'n/a'} of the time",
    ]
