"""The benchmark's code path on a handful of tiny images with the light model (the benchmark itself is
run by hand: `python -m app.bench`). One local Ray serves every mode here, to keep the test short."""

import json

import pytest

from app import bench
from app.config import compose_config


def test_marginal_rate_cancels_the_fixed_cost():
    small = bench.Timing("app", 10, 25.0, 21.0, 100.0, 150.0, 5)
    large = bench.Timing("app", 30, 35.0, 21.5, 120.0, 170.0, 15)
    result = bench.marginal(small, large)
    assert result == {
        "marginal_images_per_s": 2.0, "startup_s": 20.0, "first_result_s": 21.0,
        "overall_images_per_s": round(30 / 35, 4), "peak_rss_mb": 120.0, "detections_per_image": 0.5,
    }


def test_generated_images_are_distinct_jpegs(tmp_path):
    paths = bench.write_jpegs(tmp_path, 3, 50, 40)
    assert [p.name for p in paths] == ["img_000000.jpg", "img_000001.jpg", "img_000002.jpg"]
    assert len({p.read_bytes() for p in paths}) == 3
    from PIL import Image

    assert {Image.open(p).size for p in paths} == {(50, 40)}


def test_benchmark_smoke_run(local_ray, monkeypatch, tmp_path):
    monkeypatch.setattr(bench.ray, "shutdown", lambda: None)  # keep the shared test Ray for every run
    out = tmp_path / "results.json"
    results = bench.main([
        "throughput", "--models", "fasterrcnn_mobilenet_v3_large_320_fpn", "--modes", "bare", "app", "--counts", "1", "2",
        "--width", "64", "--height", "48", "--score-threshold", "0", "--pause", "0", "--out", str(out),
    ])
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    result = results["throughput"]["fasterrcnn_mobilenet_v3_large_320_fpn"]
    assert result["counts"] == [1, 2] and result["batch_size"] == 4
    assert [(run["mode"], run["images"]) for run in result["runs"]] == [("bare", 1), ("bare", 2), ("app", 1), ("app", 2)]
    # The same model on the same images: the same detections (threshold 0 keeps random-init ones).
    assert len({run["detections"] for run in result["runs"] if run["images"] == 2}) == 1
    assert result["runs"][1]["detections"] > 0
    assert list(result["ratios"]) == ["app_over_bare"]
    assert all(run["peak_rss_mb"] > 0 and run["first_result_s"] > 0 for run in result["runs"])
    assert "marginal ratios: app/bare = " in results["report"]

    listed = bench.main(["listing", "--listing-files", "40", "--out", ""])
    assert listed["listing"]["files"] == 40
    assert listed["report"].splitlines()[-1].startswith("listing and planning 40 files: ")


def test_tutorial_baseline_runs_the_same_model(local_ray, monkeypatch, tmp_path):
    monkeypatch.setattr(bench.ray, "shutdown", lambda: None)
    folder = tmp_path / "in"
    bench.write_jpegs(folder, 3, 64, 48)
    cfg = compose_config(["model=fasterrcnn_mobilenet_v3_large_320_fpn", "model.weights=none", "model.score_threshold=0"])
    detections, first = bench.run_tutorial(folder, cfg, tmp_path / "out")
    assert detections == bench.run_bare(folder, cfg, tmp_path / "out")[0] > 0
    assert first > 0


def test_report_of_every_suite():
    mode = {"marginal_images_per_s": 2.0, "startup_s": None, "first_result_s": 3.0, "peak_rss_mb": 900.0, "detections_per_image": 0.0}
    results = {
        "machine": {"cpus": 2, "cpu_model": "CPU", "memory_gb": 24.0, "load_average_at_start": [0.1, 0.2, 0.3]},
        "throughput": {"m": {"batch_size": 4, "counts": [1, 2], "modes": {"app": mode}, "ratios": {"app_over_bare": None}}},
        "memory": {"model": "m", "runs": [{"images": 5, "peak_rss_mb": 100.0, "seconds": 9.0}], "peak_ratio": 1.0},
        "listing": {"files": 7, "seconds": 0.5},
    }
    assert bench.report(results).splitlines() == [
        "machine: 2 CPUs (CPU), 24.0 GB, load average at start 0.1",
        "m, batch 4, runs of 1 and 2 images:",
        "  mode      marginal img/s start-up s first result s peak RSS MB det/img",
        "  app                2.000        n/a            3.0         900     0.0",
        "  marginal ratios: app/bare = n/a",
        "memory (m, app): peak RSS 5 images: 100 MB in 9 s; ratio 1.00",
        "listing and planning 7 files: 0.5 s",
    ]


@pytest.mark.parametrize("argv", [["--counts", "5", "5"], ["nonsense"]])
def test_bad_arguments_stop(argv):
    with pytest.raises(SystemExit):
        bench.parse_args(argv)
