"""Throughput and memory benchmark: `ray-detect bench [SUITE ...] [options]` (or `python -m app.bench`).

One module per suite, each with run(args, base) -> results and lines(results) -> report lines:
throughput  the app against the model alone, a bare loop, a DataLoader loop and Ray's tutorial pattern
            (app.bench.throughput);
standin     the app with a device stand-in in place of the model: how busy it keeps a device
            (app.bench.standin);
actors      one detector actor per device against two, on a host-bound stand-in (app.bench.actors);
decode      images/s one core decodes to the 800-px model size (app.bench.decode);
memory      peak memory of the app at two input counts (app.bench.memory);
inputs      the input stage at 10^6-10^7 files and paths, and a resume (app.bench.inputs);
chaos       faults injected into runs: preemption, S3 throttled, down, failing requests and a revoked
            credential, duplicate inputs, SIGTERM, the output volume full
            (app.bench.chaos);
tiles       tiled detection of large scenes against SAHI's sliced prediction (app.bench.tiles);
sinks       what a committed row costs in the Parquet dataset, a Delta table and an Iceberg table
            (app.bench.sinks);
video       frames/s of videos through the app against read_videos and the same detector, and one long
            video against many short ones (app.bench.video).
What they share (generated inputs, timings, arrival times and the rate after warm-up, the marginal rate, peak
memory) is in app.bench.harness.

Memory is the peak, sampled every 0.5 s, of the resident set size (RSS) summed over this process and
every process it started (Ray's GCS, raylet, agents and workers). Pages shared between processes
(Ray's object store, libraries) count once per process that maps them, so the sum is an upper bound.
Results go to a JSON file (benchmarks/results.json by default).
"""

import argparse
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from app.bench import actors, chaos, decode, inputs, memory, sinks, standin, throughput, tiles, video
from app.bench.harness import DEVICE, VOC_LIKE_SIZES, machine
from app.bench.throughput import CPU_MODES, DEFAULT_BASELINE_BATCH_SIZES, GPU_MODES, MODELS, MODES
from app.exit_codes import CommandParser
from app.precision import AUTOCAST_DTYPES

PROG = "ray-detect bench"

# The suites by name, in the order they run and report.
SUITES = {"throughput": throughput, "standin": standin, "actors": actors, "decode": decode, "memory": memory, "inputs": inputs,
          "chaos": chaos, "tiles": tiles, "sinks": sinks, "video": video}

log = logging.getLogger(__name__)


def report(results: dict) -> str:
    """The results as text: the machine, then a few lines per suite."""
    info = results["machine"]
    lines = [f"machine: {info['cpus']} CPUs ({info['cpu_model']}), {info['memory_gb']} GB, "
             f"load average at start {info['load_average_at_start'][0]}"]
    for name, suite in SUITES.items():
        if name in results:
            lines += suite.lines(results[name])
    return "\n".join(lines)


def size_arg(text: str) -> tuple[int, int]:
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not WIDTHxHEIGHT") from None
    return width, height


def parse_args(argv=None) -> argparse.Namespace:
    parser = CommandParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("suites", nargs="*", metavar="SUITE",
                        help="throughput (default), standin, actors, decode, memory, inputs, chaos, tiles, sinks or all")
    parser.add_argument("--models", nargs="+", default=list(MODELS), help="torchvision model names")
    parser.add_argument("--modes", nargs="+", choices=MODES,
                        help=f"throughput modes (default: {' '.join(CPU_MODES)}; with CUDA {' '.join(GPU_MODES)})")
    parser.add_argument("--precisions", nargs="+", default=["fp32"], choices=list(AUTOCAST_DTYPES),
                        help="inference.precision values to run every mode at (fp16/bf16: layers in half precision)")
    parser.add_argument("--baseline-batch-sizes", "--bare-batch-sizes", nargs="+", type=int,
                        help="batch sizes every throughput baseline runs at; each one's fastest stands for it "
                             f"(default: {' '.join(map(str, DEFAULT_BASELINE_BATCH_SIZES['cpu']))}; "
                             f"with CUDA {' '.join(map(str, DEFAULT_BASELINE_BATCH_SIZES['cuda']))})")
    parser.add_argument("--actors-per-gpu", type=int, help="the throughput suite's app at inference.actors_per_gpu=N (with CUDA)")
    parser.add_argument("--app-overrides", nargs="+", default=[], metavar="KEY=VALUE",
                        help="the throughput suite's app with these config overrides (e.g. inference.channels_last=true); "
                             "the baselines run as they are")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each throughput mode, interleaved (default: 3)")
    parser.add_argument("--warm-up", type=float, default=0.2,
                        help="share of a throughput run's images before its rate is timed (default: 0.2)")
    parser.add_argument("--count", type=int, help="images of each throughput and actors run (default: per model, 400 for "
                                                  "actors; else the larger of --counts)")
    parser.add_argument("--counts", nargs=2, type=int, help="the two input counts of the standin suite (default: 200 1000)")
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
    parser.add_argument("--host-ms", type=float, default=10.0,
                        help="the actors suite's host work per image, with the GIL held, before the stand-in's device time")
    parser.add_argument("--memory-model", default="fasterrcnn_mobilenet_v3_large_320_fpn")
    parser.add_argument("--memory-counts", nargs=2, type=int, default=[500, 5000])
    parser.add_argument("--tree-files", type=int, default=1_000_000, help="files of the inputs suite's tree")
    parser.add_argument("--manifest-paths", nargs="+", type=int, default=[1_000_000, 10_000_000],
                        help="paths of the inputs suite's manifests; the largest is also resumed")
    parser.add_argument("--chaos-images", type=int, default=2000, help="images of the chaos suite's runs")
    parser.add_argument("--removals", type=int, default=5, help="worker nodes the chaos suite's preemption removes")
    parser.add_argument("--chaos-faults", nargs="+", choices=list(chaos.FAULTS), default=list(chaos.FAULTS),
                        help="the chaos suite's faults to run (default: all)")
    parser.add_argument("--sink-rows", type=int, default=200_000, help="rows the sinks suite commits to each output")
    parser.add_argument("--sink-rows-per-file", type=int, default=10_000,
                        help="rows per commit in the sinks suite (output.rows_per_file)")
    parser.add_argument("--video-fps", type=int, default=5, help="frames detected per second of video in the video suite")
    parser.add_argument("--video-stand-in-ms", type=float, default=2.0, help="the video suite's device stand-in's milliseconds per frame")
    parser.add_argument("--segment-s", type=float, help="the video suite's data.video.segment_s (default: the app's)")
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
    if args.baseline_batch_sizes is None:
        args.baseline_batch_sizes = DEFAULT_BASELINE_BATCH_SIZES[DEVICE.type]
    if args.count is None and args.counts:
        args.count = args.counts[1]
    if args.repeats < 1:
        parser.error("--repeats: at least 1")
    if not 0 <= args.warm_up < 1:
        parser.error("--warm-up: a share of the images, from 0 up to (not including) 1")
    if args.tiles_counts[0] >= args.tiles_counts[1]:
        parser.error("--tiles-counts: the second count must be larger")
    if args.counts and args.counts[0] >= args.counts[1]:
        parser.error("--counts: the second count must be larger")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # The app's progress lines are muted: "app" is the parent of its modules' loggers (app.pipeline, ...),
    # which inherit its level; the benchmark's own loggers (app.bench and its modules) stay at INFO.
    logging.getLogger("app").setLevel(logging.WARNING)
    log.setLevel(logging.INFO)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    base = Path(args.workdir or tempfile.mkdtemp(prefix="ray-detect-bench-"))
    base.mkdir(parents=True, exist_ok=True)
    results = {"machine": machine(), "command": f"{PROG} " + " ".join(argv or [])}
    try:
        for name, suite in SUITES.items():
            if name in args.suites or "all" in args.suites:
                results[name] = suite.run(args, base)
    finally:
        if not args.workdir:
            shutil.rmtree(base, ignore_errors=True)
    results["report"] = report(results)
    print(results["report"])
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return results
