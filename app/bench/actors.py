"""The benchmark's actors suite (`ray-detect bench actors`): one detector actor per device against two, on a
host-bound device stand-in. Each image costs --host-ms of host work with the GIL held (a Python thread
launching kernels and looping over images in the RPN and ROI heads) and then --stand-in-ms of "device"
time that the actors sharing a device take in turns (app.bench.standin). One actor leaves the device idle
while it works on the host; a second one fills that time. The runs are on a local Ray that advertises one
GPU (a stand-in too: the actors compute on the CPU, inference.cpu_fallback), with the light 320-px model's
input size, so that decoding costs little beside the stand-in.
"""

import functools
import time
from dataclasses import asdict
from pathlib import Path

import ray

from app.bench.harness import Timing, input_folder, model_overrides, number, rate_after_warm_up, run_app, spread, timed
from app.bench.standin import stand_in_detector
from app.config import compose_config

MODEL = "fasterrcnn_mobilenet_v3_large_320_fpn"
ACTORS_PER_DEVICE = (1, 2)
# Images per model call: one, so that results reach the driver in calls of a few images, often enough to
# time the rate after warm-up.
BATCH_SIZE = 1
# CPUs of the local Ray: one per actor at two actors per device, the decode tasks sharing them.
RAY_CPUS = 2


def run(args, base: Path) -> dict:
    count = args.count or 400
    detector = stand_in_detector(args.stand_in_ms / 1000, args.host_ms / 1000)
    folder = input_folder(base, f"actors-{count}", count, args)
    warm_up = round(args.warm_up * count)
    runs: dict[int, list[Timing]] = {n: [] for n in ACTORS_PER_DEVICE}
    ray.init(address="local", num_cpus=RAY_CPUS, num_gpus=1, include_dashboard=False, log_to_driver=False)
    try:
        for repeat in range(args.repeats):
            for actors in ACTORS_PER_DEVICE:
                overrides = [*model_overrides(MODEL, args), f"inference.batch_size={BATCH_SIZE}", "inference.cpu_fallback=true",
                             f"inference.actors_per_gpu={actors}"]
                out = base / f"out-actors-{actors}-{repeat}"
                app_run = functools.partial(run_app, folder, compose_config(overrides), out, BATCH_SIZE, detector, keep_ray=True)
                runs[actors].append(timed(f"{actors} per device", app_run, count))
                time.sleep(args.pause)
    finally:
        ray.shutdown()
    rates = {n: [rate_after_warm_up(timing.arrivals, warm_up) for timing in timings] for n, timings in runs.items()}
    ratios = [two / one if one and two else None for one, two in zip(rates[1], rates[2])]
    return {
        "host_ms": args.host_ms,
        "device_ms": args.stand_in_ms,
        "count": count,
        "warm_up_images": warm_up,
        "images_per_s": {str(n): spread(values) for n, values in rates.items()},
        "two_over_one": spread(ratios, 3),
        # The share of the model calls' time the stand-in device was busy (the app's summary: app.summary).
        "device_busy_share": {str(n): spread([timing.device_busy_share for timing in timings], 3) for n, timings in runs.items()},
        "runs": {str(n): [asdict(timing) for timing in timings] for n, timings in runs.items()},
    }


def lines(actors: dict) -> list[str]:
    one, two, ratio = actors["images_per_s"]["1"], actors["images_per_s"]["2"], actors["two_over_one"]
    lines = [
        f"host-bound stand-in ({actors['host_ms']} ms/image host with the GIL held, {actors['device_ms']} ms/image device), "
        f"{actors['count']} images: one actor per device {number(one['median'], 0, 1)} images/s, two "
        f"{number(two['median'], 0, 1)}, ratio {number(ratio['median'], 0, 2)} ({number(ratio['min'], 0, 2)}-{number(ratio['max'], 0, 2)})"
    ]
    busy = actors.get("device_busy_share")  # not in results written before it was measured
    if busy:
        lines.append(f"device busy in model calls, as the app's summary reports it: one actor per device "
                     f"{number(busy['1']['median'], 0, 2)}, two {number(busy['2']['median'], 0, 2)}")
    return lines
