"""The benchmark's code path on a handful of tiny images with the light model (the benchmark itself is
run by hand: `ray-detect bench`). One local Ray serves every mode here, to keep the test short."""

import dataclasses
import itertools
import json
import re
import statistics
import threading
import time
from pathlib import Path

import pytest
import ray
import torch

from app import bench
from app.bench import chaos, decode, harness, standin, throughput
from app.bench import video as bench_video
from app.config import check_config, compose_config
from app.summary import HOST_BOUND_BELOW


def test_marginal_rate_cancels_the_fixed_cost():
    small = harness.Timing("app", 10, 25.0, 21.0, 100.0, 150.0, 5)
    large = harness.Timing("app", 30, 35.0, 21.5, 120.0, 170.0, 15)
    result = harness.marginal(small, large)
    assert result == {
        "marginal_images_per_s": 2.0, "startup_s": 20.0, "first_result_s": 21.0,
        "overall_images_per_s": round(30 / 35, 4), "peak_rss_mb": 120.0, "detections_per_image": 0.5,
    }


def test_generated_images_are_distinct_jpegs_of_the_sizes_in_turn(tmp_path):
    paths = harness.write_jpegs(tmp_path, 3, [(50, 40), (30, 60)])
    assert [p.name for p in paths] == ["img_000000.jpg", "img_000001.jpg", "img_000002.jpg"]
    assert len({p.read_bytes() for p in paths}) == 3
    from PIL import Image

    assert [Image.open(p).size for p in paths] == [(50, 40), (30, 60), (50, 40)]


def test_default_sizes_mix_orientations_like_pascal_voc():
    landscape = [size for size in harness.VOC_LIKE_SIZES if size[0] > size[1]]
    assert (len(landscape), len(harness.VOC_LIKE_SIZES)) == (6, 8)


def test_rate_after_warm_up_counts_from_the_arrival_that_ends_the_warm_up():
    # A 10 s start-up before the first arrival, then 2 images every 0.5 s but a slow last batch.
    arrivals = [[10.0, 2], [10.5, 2], [11.0, 2], [12.0, 2]]
    assert harness.rate_after_warm_up(arrivals, 3) == round(4 / 1.5, 4)  # the 2nd arrival ends the warm-up
    assert harness.rate_after_warm_up(arrivals, 4) == round(4 / 1.5, 4)
    assert harness.rate_after_warm_up(arrivals, 0) == 3.0  # at least the first arrival: 6 images in 2 s
    assert harness.rate_after_warm_up(arrivals, 7) is None  # nothing arrives after the warm-up
    assert harness.rate_after_warm_up([], 1) is None
    assert throughput.warm_up_images(200, 0.2) == 40 and throughput.warm_up_images(4, 0.2) == 1 and throughput.warm_up_images(4, 0) == 1


def test_spread_is_the_median_and_range_of_the_figures_that_have_one():
    assert harness.spread([3.0, None, 1.0, 2.5]) == {"median": 2.5, "min": 1.0, "max": 3.0}
    assert harness.spread([2.0, 1.0]) == {"median": 1.5, "min": 1.0, "max": 2.0}
    assert harness.spread([None]) == {"median": None, "min": None, "max": None}


def summary_of(rates):
    return {"images_per_s": harness.spread(rates), "rates": rates}


def test_ratios_take_each_baselines_fastest_batch_size_repeat_by_repeat():
    modes = {"bare@1": summary_of([2.0, 2.2]), "bare@2": summary_of([2.5, 2.4]), "bare@4": summary_of([1.5, None]),
             "tutorial@1": summary_of([None, None]), "tutorial@2": summary_of([1.0, 0.8]), "app": summary_of([2.25, 2.4])}
    assert throughput.best_batch_sizes(modes) == {"bare": "bare@2", "tutorial": "tutorial@2"}
    bare = {"baseline": "bare@2", "median": 0.95, "min": 0.9, "max": 1.0, "ratios": [0.9, 1.0]}
    assert throughput.ratios(modes) == {
        "app_over_bare": bare,
        "app_over_tutorial": {"baseline": "tutorial@2", "median": 2.625, "min": 2.25, "max": 3.0, "ratios": [2.25, 3.0]},
        "app_over_best": bare,
    }
    assert throughput.ratios({"bare@1": summary_of([None])}) == {}


def rate_from(arrivals, warm_up):
    """The rate after warm-up, recomputed here on its own: images after the arrival that completes the
    warm-up over the seconds from that arrival to the last."""
    arrived = list(itertools.accumulate(images for _, images in arrivals))
    start = next(index for index, total in enumerate(arrived) if total >= warm_up)
    seconds = arrivals[-1][0] - arrivals[start][0]
    return round((arrived[-1] - arrived[start]) / seconds, 4) if arrived[-1] > arrived[start] and seconds > 0 else None


def test_benchmark_smoke_run(local_ray, monkeypatch, tmp_path):
    """The light model on 6 tiny images: the model alone and the bare loop at batch sizes 1 and 3, and the app
    at batch 1 (so that its rows arrive in several tables), twice each; every figure is
    recomputed from the recorded arrival times."""
    monkeypatch.setattr(harness.ray, "shutdown", lambda: None)  # keep the shared test Ray for every run
    out = tmp_path / "results.json"
    results = bench.main([
        "throughput", "--models", "fasterrcnn_mobilenet_v3_large_320_fpn", "--modes", "model", "bare", "app",
        "--baseline-batch-sizes", "1", "3", "--count", "6", "--repeats", "2", "--warm-up", "0.3", "--batch-size", "1",
        "--sizes", "64x48", "48x64", "--score-threshold", "0", "--pause", "0", "--out", str(out),
    ])
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    result = results["throughput"]["fasterrcnn_mobilenet_v3_large_320_fpn"]
    assert {key: result[key] for key in ("count", "warm_up_images", "repeats", "batch_size", "baseline_batch_sizes", "device")} == {
        "count": 6, "warm_up_images": 2, "repeats": 2, "batch_size": 1, "baseline_batch_sizes": [1, 3], "device": str(harness.DEVICE)}
    modes = ["model@1", "model@3", "bare@1", "bare@3", "app"]
    assert [(run["mode"], run["images"]) for run in result["runs"]] == [(mode, 6) for mode in modes for _ in range(2)]
    # The same model on the same images: --max-detections (5) each; threshold 0 keeps random-init ones.
    assert {run["detections"] for run in result["runs"]} == {30}
    runs = {mode: [run for run in result["runs"] if run["mode"] == mode] for mode in modes}
    # The baselines' results arrive a batch at a time; every image arrives once, in time order.
    for mode in modes[:-1]:
        size = int(mode.partition("@")[2])
        assert [[images for _, images in run["arrivals"]] for run in runs[mode]] == [[size] * (6 // size)] * 2
    for run in result["runs"]:
        times = [at for at, _ in run["arrivals"]]
        assert sum(images for _, images in run["arrivals"]) == 6 and times == sorted(times)
        assert run["first_result_s"] == times[0]  # the first arrival is the first result
    assert len(runs["app"][0]["arrivals"]) >= 3  # rows in several tables, so the app has a rate after warm-up
    # Each mode's rates recomputed from its arrivals, and their median and range.
    for mode in modes:
        rates = [rate_from(run["arrivals"], 2) for run in runs[mode]]
        assert result["modes"][mode]["rates"] == rates and all(rates), mode
        assert result["modes"][mode]["images_per_s"] == {"median": round(statistics.median(rates), 4), "min": min(rates), "max": max(rates)}
    # The sweep keeps each baseline's fastest batch size of those recorded; the ratios are repeat by repeat.
    medians = {mode: statistics.median(result["modes"][mode]["rates"]) for mode in modes}
    best = {baseline: max((f"{baseline}@1", f"{baseline}@3"), key=medians.get) for baseline in ("model", "bare")}
    assert result["best_batch_sizes"] == {baseline: int(mode[-1]) for baseline, mode in best.items()}
    assert list(result["ratios"]) == ["app_over_model", "app_over_bare", "app_over_best"]
    for baseline, mode in best.items():
        each = [round(app / base, 4) for app, base in zip(result["modes"]["app"]["rates"], result["modes"][mode]["rates"])]
        assert result["ratios"][f"app_over_{baseline}"] == {"baseline": mode, "median": round(statistics.median(each), 4),
                                                             "min": min(each), "max": max(each), "ratios": each}
    assert result["ratios"]["app_over_best"]["baseline"] == max(best.values(), key=medians.get)
    assert all(run["peak_rss_mb"] >= run["peak_driver_rss_mb"] > 0 for run in result["runs"])  # the sum holds the driver
    app_ratio = result["ratios"]["app_over_model"]
    assert (f"  ratios, repeat by repeat: app/{best['model']} = {app_ratio['median']:.2f} "
            f"({app_ratio['min']:.2f}-{app_ratio['max']:.2f}), app/{best['bare']} = ") in results["report"].splitlines()[-1]



def test_stand_in_suite(local_ray, monkeypatch, tmp_path):
    """The app with the device stand-in at 20 ms per image: one actor, batch 8; then the host time."""
    monkeypatch.setattr(harness.ray, "shutdown", lambda: None)
    results = bench.main(["standin", "--counts", "8", "24", "--stand-in-ms", "20", "--pause", "0", "--out", ""])
    standin = results["standin"]
    assert [(run["images"], run["detections"]) for run in standin["runs"]] == [(8, 40), (24, 120)]
    rate = standin["app"]["marginal_images_per_s"]  # None when start-up noise swamps 16 images' 0.3 s
    assert standin["ratio"] == (round(rate / 50, 3) if rate else None)
    assert standin["host_time"]["image_size"] == [1066, 800] and standin["host_time"]["ms_per_image"] > 0
    assert results["report"].splitlines()[1].startswith("device stand-in at 20.0 ms/image (50.0 images/s), app with one actor")


def test_tiles_suite(local_ray, monkeypatch, tmp_path):
    """SAHI's loop at batch sizes 1 and 8 and the app on one and two small scenes (400x300, 300x400 in
    320-px tiles: 2 tiles each), then the stand-in; every figure is recomputed from its parts."""
    monkeypatch.setattr(harness.ray, "shutdown", lambda: None)
    results = bench.main(["tiles", "--tiles-counts", "1", "2", "--tiles-sizes", "400x300", "300x400", "--stand-in-ms", "5",
                          "--pause", "0", "--out", ""])
    tiles = results["tiles"]
    assert (tiles["tile_size"], tiles["tiles"], tiles["tiles_per_scene"]) == (320, [2, 4], 2.0)
    assert [(run["mode"], run["images"]) for run in tiles["runs"]] == [
        (mode, count) for mode in ("sahi@1", "sahi@8", "app") for count in (1, 2)]
    sahi = {(run["mode"], run["images"]): run["detections"] for run in tiles["runs"] if run["mode"].startswith("sahi")}
    # The same loop whatever SAHI's batch size: the same detections, a few per scene (3 per tile, merged).
    assert sahi[("sahi@1", 1)] == sahi[("sahi@8", 1)] and sahi[("sahi@1", 2)] == sahi[("sahi@8", 2)]
    assert 0 < sahi[("sahi@1", 1)] <= 6 and all(run["detections"] > 0 for run in tiles["runs"])
    for summary in tiles["modes"].values():
        rate = summary["marginal_images_per_s"]
        assert summary["marginal_tiles_per_s"] == (round(rate * 2.0, 2) if rate else None)
    rates = {mode: summary["marginal_images_per_s"] for mode, summary in tiles["modes"].items()}
    best = max(rates["sahi@1"] or 0, rates["sahi@8"] or 0)
    assert tiles["app_over_sahi"] == (round(rates["app"] / best, 3) if rates["app"] and best else None)
    standin = tiles["standin"]
    assert [(run["images"], run["detections"] > 0) for run in standin["runs"]] == [(1, True), (2, True)]
    extra = standin["runs"][1]["seconds"] - standin["runs"][0]["seconds"]
    assert standin["busy_fraction"] == (round(2 * 0.005 / extra, 3) if extra > 0 else None)
    assert results["report"].splitlines()[1].startswith("tiles, fasterrcnn_mobilenet_v3_large_320_fpn on cpu, 2 tiles of 320 px a scene: sahi@1 ")


@pytest.mark.slow
def test_decode_suite(monkeypatch, tmp_path):
    monkeypatch.setattr(decode, "DECODE_CASES", {"small": [(200, 150)], "large": [(1600, 1200)]})
    results = bench.main(["decode", "--workdir", str(tmp_path), "--out", ""])
    assert list(results["decode"]) == ["small", "large"]
    assert all(rates["reduced"] > 0 and rates["full"] > 0 for rates in results["decode"].values())
    # The report says what the results hold, line for line.
    assert results["report"].splitlines()[1:] == [
        f"decode {name} JPEGs to 800 px, one core: {rates['reduced']:.1f} images/s ({rates['full']:.1f} decoding them at full size)"
        for name, rates in results["decode"].items()]


def test_stand_in_model_holds_the_time_and_returns_boxes_inside_each_image():
    model = standin.StandInModel(0.05)
    started = time.monotonic()
    outputs = model([torch.zeros(3, 100, 200, dtype=torch.uint8), torch.zeros(3, 50, 40, dtype=torch.uint8)])
    assert time.monotonic() - started >= 0.1
    assert [len(output["labels"]) for output in outputs] == [5, 5]
    assert outputs[0]["boxes"][-1].tolist() == [160.0, 80.0, 200.0, 100.0]
    assert outputs[1]["boxes"][0].tolist() == [0.0, 0.0, 8.0, 10.0]


def test_a_host_bound_stand_in_holds_the_gil_and_actors_sharing_its_device_take_it_in_turns(tmp_path):
    """Host time: the calling thread computes (its CPU time grows by the host time) rather than sleeping as
    the device time does. Device time: two stand-ins with the same lock file (two actors Ray gave the same
    GPU) hold it one after the other, so that two calls take the sum of their device times, and both count
    the device's busy seconds of the two. All are lower bounds, which a loaded machine only exceeds."""
    model = standin.StandInModel(0.0, 0.1)
    cpu_started = time.thread_time()
    model([torch.zeros(3, 10, 10, dtype=torch.uint8)] * 2)
    assert time.thread_time() - cpu_started >= 0.2
    shared = [standin.StandInModel(0.1) for _ in range(2)]
    for model in shared:
        model.device_lock = str(tmp_path / "gpu0.lock")
    spans = []

    def call(model):
        begun = time.perf_counter()
        model([torch.zeros(3, 10, 10, dtype=torch.uint8)] * 2)
        spans.append((begun, time.perf_counter()))

    threads = [threading.Thread(target=call, args=(model,)) for model in shared]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert max(end for _, end in spans) - min(begun for begun, _ in spans) >= 0.4  # 2 x 0.2 s, not overlapped
    assert shared[0].busy_seconds() == shared[1].busy_seconds() >= 0.4
    alone = standin.StandInModel(0.1)
    alone([torch.zeros(3, 10, 10, dtype=torch.uint8)])
    assert alone.device_lock is None and alone.busy_seconds() >= 0.1


def test_two_actors_per_device_recover_what_a_host_bound_model_leaves_idle():
    """The actors suite: 10 ms of host work with the GIL held and 10 ms of device time per image. One
    actor per device leaves the device idle while it works on the host (20 ms an image); two actors on one
    device overlap one's host work with the other's device time (10 ms an image at best): at least 1.3x
    (1.9x measured here, unloaded). The rates are recomputed from the runs' arrival times. The app's
    summary finds the one-actor run host-bound (its device busy half its model calls' time at best), and
    the device busier in two actors' calls than in one's."""
    if ray.is_initialized():
        ray.shutdown()  # the module's shared Ray has no GPU; the suite starts its own
    results = bench.main(["actors", "--stand-in-ms", "10", "--host-ms", "10", "--count", "160", "--repeats", "1",
                          "--pause", "0", "--out", ""])
    actors = results["actors"]
    assert [(run["images"], run["detections"]) for runs in actors["runs"].values() for run in runs] == [(160, 800)] * 2
    rates = {n: [harness.rate_after_warm_up(run["arrivals"], 32) for run in runs] for n, runs in actors["runs"].items()}
    assert {n: spread["median"] for n, spread in actors["images_per_s"].items()} == {n: values[0] for n, values in rates.items()}
    assert actors["two_over_one"]["median"] == round(rates["2"][0] / rates["1"][0], 3) >= 1.3
    busy = {n: runs[0]["device_busy_share"] for n, runs in actors["runs"].items()}
    assert busy["1"] < HOST_BOUND_BELOW and busy["1"] < busy["2"], busy
    assert {n: spread["median"] for n, spread in actors["device_busy_share"].items()} == busy
    assert results["report"].splitlines()[1].startswith("host-bound stand-in (10.0 ms/image host with the GIL held, 10.0 ms/image device)")
    assert results["report"].splitlines()[2] == (f"device busy in model calls, as the app's summary reports it: one actor per device "
                                                 f"{busy['1']:.2f}, two {busy['2']:.2f}")


def test_the_sinks_suite_commits_the_same_rows_to_each_output_and_reports_their_cost_per_row(monkeypatch):
    """The sinks suite on 600 rows in commits of 200: three commits in each output, each output scanned back
    whole (the suite checks one row per path), and the figures recomputed from the recorded seconds."""
    for key in ("TYPE", "URI", "WAREHOUSE"):
        monkeypatch.delenv(f"PYICEBERG_CATALOG__BENCH__{key}", raising=False)  # the suite sets them, for its own catalog
    results = bench.main(["sinks", "--sink-rows", "600", "--sink-rows-per-file", "200", "--repeats", "1", "--out", ""])
    sinks = results["sinks"]
    assert sinks["commits"] == {"parquet": 3, "delta": 3, "iceberg": 3}
    for sink, (run,) in sinks["runs"].items():
        assert sinks["commit_us_per_row"][sink]["median"] == round(1e6 * run["commit_s"] / 600, 2)
    assert sinks["commit_over_parquet"]["parquet"] == 1.0
    lines = results["report"].splitlines()[1:]
    assert lines[0] == "outputs, 600 rows of 5 detections in commits of 200 rows, median of repeats:"
    assert [line.split()[0] for line in lines[1:]] == ["parquet", "delta", "iceberg"]


def test_the_video_suite_detects_the_same_frames_as_read_videos_and_reports_rates_from_their_arrivals(monkeypatch, tmp_path):
    """The video suite on small videos (2 s of 160x90 and 90x160, one of 4 s against two of 2 s), once, the
    baseline at batch 4: both pipelines detect the same frames (5 a second: read_videos keeps every 6th
    of 30, the app the first of each 0.2 s), and the figures come from the runs' own arrivals and seconds."""
    if ray.is_initialized():
        ray.shutdown()  # the module's shared Ray has no GPU; the suite starts its own
    monkeypatch.setattr(bench_video, "MIXED", [(160, 90, 2), (90, 160, 2)])
    monkeypatch.setattr(bench_video, "LONG_S", 4)
    monkeypatch.setattr(bench_video, "SHORT_S", 2)
    monkeypatch.setattr(bench_video, "SIZE", (160, 90))
    monkeypatch.setattr(bench_video, "BASELINE_BATCH_SIZES", (4,))
    results = bench.main(["video", "--repeats", "1", "--pause", "0", "--workdir", str(tmp_path), "--out", ""])
    video = results["video"]
    assert video["frames"] == {"mixed": 20, "long": 20, "short": 20} and video["baseline_batch_size"] == 4
    for name in ("mixed", "long", "short"):
        (app,), (baseline,) = video["runs"][f"app {name}"], video["runs"][f"read_videos {name} batch 4"]
        assert baseline["images"] == sum(count for _, count in baseline["arrivals"]) == 20
        rate = bench_video.warm_rate(harness.Timing(**app))  # None where every frame arrived at once
        assert video["app_frames_per_s"][name]["median"] == (round(rate, 2) if rate else None)
        assert video["seconds"]["app"][name]["median"] == round(app["seconds"], 2)
    long_short = video["long_over_short_seconds"]["read_videos"]["median"]
    assert long_short == round(video["runs"]["read_videos long batch 4"][0]["seconds"] / video["runs"]["read_videos short batch 4"][0]["seconds"], 3)
    lines = results["report"].splitlines()[1:]
    assert lines[0] == ("video at 5 frames/s of video, stand-in device 2.0 ms/frame, read_videos at its best batch size 4; "
                        "frames/s once warm, and whole runs:")
    assert [line.split()[0] for line in lines[1:4]] == ["mixed", "long", "short"]
    assert lines[4].startswith("  one 4-s video against 2 of 2 s, wall time long/short: app ")


def test_tutorial_baseline_runs_the_same_model(local_ray, monkeypatch, tmp_path):
    monkeypatch.setattr(harness.ray, "shutdown", lambda: None)
    folder = tmp_path / "in"
    harness.write_jpegs(folder, 3, [(64, 48)])
    cfg = compose_config(["model=fasterrcnn_mobilenet_v3_large_320_fpn", "model.weights=none", "model.score_threshold=0"])
    tutorial = throughput.run_tutorial(folder, cfg, tmp_path / "out", 2)
    assert tutorial.detections == throughput.run_bare(folder, cfg, tmp_path / "out", 4).detections > 0
    # Each block of results is an arrival; the first is the first result.
    assert sum(images for _, images in tutorial.arrivals) == 3 and tutorial.first_result_s == tutorial.arrivals[0][0] > 0


def test_report_of_every_suite():
    mode = {"marginal_images_per_s": 2.0, "startup_s": None, "first_result_s": 3.0, "peak_rss_mb": 900.0, "detections_per_image": 0.0}
    rates = {"images_per_s": {"median": 2.0, "min": 1.9, "max": 2.125}, "first_result_s": 3.0, "peak_rss_mb": 900.0,
             "detections_per_image": 0.0}
    results = {
        "machine": {"cpus": 2, "cpu_model": "CPU", "memory_gb": 24.0, "load_average_at_start": [0.1, 0.2, 0.3]},
        "throughput": {"m": {"batch_size": 4, "device": "cpu", "count": 200, "warm_up_images": 40, "repeats": 3,
                             "modes": {"bare@2": {**rates, "images_per_s": {"median": None, "min": None, "max": None}}, "app": rates},
                             "ratios": {}}},
        "standin": {"ms_per_image": 10.0, "counts": [200, 1000], "ratio": 0.985, "app": {**mode, "marginal_images_per_s": 98.5},
                    "host_time": {"image_size": [1066, 800], "detections_per_image": 5, "ms_per_image": 0.0451}},
        "actors": {"host_ms": 10.0, "device_ms": 10.0, "count": 400, "images_per_s": {
                       "1": {"median": 49.5, "min": 48.0, "max": 50.25}, "2": {"median": 97.0, "min": 95.0, "max": 99.0}},
                   "two_over_one": {"median": 1.96, "min": 1.9, "max": 1.98},
                   "device_busy_share": {"1": {"median": 0.49, "min": 0.49, "max": 0.49}, "2": {"median": 0.953, "min": 0.95, "max": 0.96}}},
        "decode": {"12 MP": {"reduced": 25.46, "full": 13.8}},
        "memory": {"model": "m", "runs": [{"images": 5, "peak_rss_mb": 100.0, "seconds": 9.0}], "peak_ratio": 1.0},
        "inputs": {"manifest of 10 paths": {"inputs": 10, "todo": 4, "first_block_s": 1.25, "seconds": 2.0, "driver_peak_above_idle_mb": 30.4,
                                            "driver_peak_mb": 930.0, "first_result_s": 9.0}},
    }
    assert bench.report(results).splitlines() == [
        "machine: 2 CPUs (CPU), 24.0 GB, load average at start 0.1",
        "m on cpu, app batch 4, 200 images a run, rates after the first 40, median (min-max) of 3 repeats:",
        "  mode                             images/s first result s peak RSS MB det/img",
        "  bare@2                                n/a            3.0         900     0.0",
        "  app                   2.000 (1.900-2.125)            3.0         900     0.0",
        "  ratios, repeat by repeat: n/a",
        "device stand-in at 10.0 ms/image (100.0 images/s), app with one actor, runs of 200 and 1000 images: "
        "98.50 images/s marginal, ratio 0.985",
        "detector host time, zero-time stand-in, 1066x800 images with 5 detections: 0.045 ms/image",
        "host-bound stand-in (10.0 ms/image host with the GIL held, 10.0 ms/image device), 400 images: one actor per "
        "device 49.5 images/s, two 97.0, ratio 1.96 (1.90-1.98)",
        "device busy in model calls, as the app's summary reports it: one actor per device 0.49, two 0.95",
        "decode 12 MP JPEGs to 800 px, one core: 25.5 images/s (13.8 decoding them at full size)",
        "memory (m, app): peak RSS 5 images: 100 MB in 9 s; ratio 1.00",
        "input stage, manifest of 10 paths: first block after 1.2 s, all 10 in 2.0 s (4 to do), driver peak RSS +30 MB "
        "(peak 930 MB); the app's first result after 9.0 s",
    ]


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--counts", "5", "5"], "--counts: the second count must be larger"),
        (["nonsense"], "unknown suite nonsense: choose throughput, standin, actors, decode, memory, inputs, chaos, tiles, sinks, "
                      "video or all"),
        (["--tiles-counts", "3", "2"], "--tiles-counts: the second count must be larger"),
        (["--sizes", "64by48"], "argument --sizes: '64by48' is not WIDTHxHEIGHT"),
        (["--repeats", "0"], "--repeats: at least 1"),
        (["--warm-up", "1"], "--warm-up: a share of the images, from 0 up to (not including) 1"),
    ],
)
def test_bad_arguments_stop(argv, message, capsys):
    with pytest.raises(SystemExit) as stopped:
        bench.parse_args(argv)
    assert stopped.value.code == 2
    assert capsys.readouterr().err == f"ray-detect bench: error: {message}\n"



def test_the_gpu_checks_benchmark_runs_pass_the_benchmarks_own_checks():
    """scripts/gpu-check.sh runs on a lent GPU, with little time to rerun: each of its benchmark runs
    (`bench <name> <timeout> <arguments>`) parses here, with the heavy and light model names it sets."""
    script = (Path(__file__).parent.parent / "scripts" / "gpu-check.sh").read_text().replace("\\\n", "")
    names = dict(re.findall(r"(heavy|light)=(\S+)", script))
    runs = re.findall(r"^  bench (\S+) \d+ (.+)$", script, re.MULTILINE)
    assert [name for name, _ in runs] == ["bench-heavy-fp16", "bench-heavy-fp16-two-actors", "bench-heavy-fp16-channels-last",
                                          "bench-heavy-fp32", "bench-light-fp32"]
    for _, arguments in runs:
        args = bench.parse_args(["throughput", *arguments.replace("$heavy", names["heavy"]).replace("$light", names["light"]).split()])
        assert set(args.models) <= set(throughput.MODELS)
        check_config(compose_config(["data.path=x", "output.path=y", *args.app_overrides]))
    assert bench.parse_args(["throughput", *runs[1][1].split()]).actors_per_gpu == 2
    assert bench.parse_args(["throughput", *runs[2][1].split()]).app_overrides == [
        "inference.channels_last=true", "inference.cudnn_benchmark=true"]


def test_chaos_lines_count_rows_duplicates_and_lost_inputs():
    """The chaos suite's arithmetic (app.chaos): rows, duplicates beyond one row per path, inputs without a
    row, and the rate of all runs against the undisturbed run's."""
    assert chaos.counts(["a", "b", "b", "c"], 4) == (4, 1, 1)
    assert chaos.counts(["a", "b", "c", "d"], 4) == (4, 0, 0)
    outcome = chaos.Outcome("preemption", inputs=2000, injected=6, retries=0, runs=2, rows=2000, duplicates=0, lost=0,
                            seconds=250.0, undisturbed_seconds=200.0)
    assert outcome.line() == ("chaos preemption: 6 faults injected, 0 reads retried, 2 run(s), 2000 rows, 0 duplicates, "
                              "0 lost; 8.00 images/s, 0.80x the undisturbed run's 10.00")
    assert chaos.lines([dataclasses.asdict(outcome)]) == [outcome.line()]
