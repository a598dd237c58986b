"""The benchmark's memory suite (`ray-detect bench memory`): the app's peak memory (RSS summed over every
process, harness.PeakMemory) at two input counts, 500 and 5,000 images by default."""

import functools
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

from app.bench.harness import input_folder, model_overrides, run_app, timed
from app.config import compose_config


def run(args, base: Path) -> dict:
    model = args.memory_model
    cfg_overrides = model_overrides(model, args)
    runs = []
    for count in args.memory_counts:
        folder = input_folder(base, f"memory-{count}", count, args)
        out = Path(tempfile.mkdtemp(dir=base, prefix="out-memory-"))
        app_run = functools.partial(run_app, folder, compose_config(cfg_overrides), out, 0)
        runs.append(timed("app", app_run, count))
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(folder, ignore_errors=True)
    small, large = runs[0], runs[-1]
    return {
        "model": model,
        "runs": [asdict(run) for run in runs],
        "peak_ratio": round(large.peak_rss_mb / small.peak_rss_mb, 3),
    }


def lines(mem: dict) -> list[str]:
    runs = ", ".join(f"{r['images']} images: {r['peak_rss_mb']:.0f} MB in {r['seconds']:.0f} s" for r in mem["runs"])
    return [f"memory ({mem['model']}, app): peak RSS {runs}; ratio {mem['peak_ratio']:.2f}"]
