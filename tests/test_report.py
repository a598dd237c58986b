"""The HTML report: boxes really drawn on previews, exact counts in index.html, filters, URIs, and
one-line errors. Results directories are written here directly (Parquet + manifest), without Ray."""

import io
import os
import re
import subprocess
import sys

import fsspec
import numpy as np
import pyarrow.fs as pafs
import pytest
from PIL import Image

from app import report
from tests.support.results import error_row, ok_row, write_results

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GRAY = (128, 128, 128)


def gray_image(path, width=200, height=150):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, height), GRAY).save(path, quality=95)
    return path


def close(pixel, color, tolerance=30):
    return all(abs(int(a) - int(b)) <= tolerance for a, b in zip(pixel, color))


@pytest.fixture
def results_dir(tmp_path):
    """3 readable images (cat ×3, dog ×2, person ×1) and 2 that could not be read."""
    images = [gray_image(tmp_path / "images" / f"{name}.jpg") for name in ("a", "b", "c")]
    rows = [
        ok_row(images[0], [(17, "cat", 0.95, [40, 30, 160, 120]), (18, "dog", 0.42, [10, 10, 30, 30])]),
        ok_row(images[1], [(17, "cat", 0.91, [0, 0, 50, 50]), (17, "cat", 0.55, [60, 60, 90, 90]), (1, "person", 0.72, [5, 5, 100, 140])]),
        ok_row(images[2], [(18, "dog", 0.99, [20, 20, 180, 130])]),
        error_row(tmp_path / "images" / "broken.png", "not_an_image", "not a recognised image format"),
        error_row(tmp_path / "images" / "huge.tif", "too_large", "file is 99 bytes, over data.max_file_bytes=10"),
    ]
    return write_results(tmp_path / "results", rows)


def previews_in(page):
    return re.findall(r'<img src="(previews/[^"]+)"', page)


def test_preview_has_the_box_drawn_at_its_place(results_dir, tmp_path):
    report.main([results_dir, "--out", str(tmp_path / "report")])
    preview = np.asarray(Image.open(tmp_path / "report" / "previews" / "0001_a.jpg"))
    assert preview.shape == (150, 200, 3)
    cat_color = report.label_color(17)
    # The cat box [40, 30, 160, 120] is drawn 3 px wide inside its corners: left and right edges, bottom.
    assert close(preview[100, 41], cat_color) and close(preview[100, 158], cat_color)
    assert close(preview[118, 100], cat_color)
    # Inside the box and outside every box the image is untouched.
    assert close(preview[90, 100], GRAY, 6) and close(preview[140, 190], GRAY, 6)
    # The dog box [10, 10, 30, 30] (score 0.42) is drawn too, in its own colour.
    assert close(preview[25, 11], report.label_color(18))


def test_min_score_leaves_weaker_boxes_undrawn(results_dir, tmp_path):
    report.main([results_dir, "--out", str(tmp_path / "report"), "--min-score", "0.5"])
    page = (tmp_path / "report" / "index.html").read_text()
    assert previews_in(page) == ["previews/0001_a.jpg", "previews/0002_b.jpg", "previews/0003_c.jpg"]
    preview = np.asarray(Image.open(tmp_path / "report" / "previews" / "0001_a.jpg"))
    assert close(preview[100, 41], report.label_color(17))
    assert close(preview[25, 11], GRAY, 6)  # the 0.42 dog box is not drawn
    assert "a.jpg · 1 box</figcaption>" in page and "b.jpg · 3 boxes</figcaption>" in page


def test_previews_read_images_under_the_jobs_limits(tmp_path, capsys):
    """Images replaced since the run by ones over the job's limits (its settings) are not decoded: a file
    over data.max_file_bytes is not read past the limit, an image over data.max_image_pixels is not
    decoded; their previews say why, and the report goes on."""
    noisy = tmp_path / "images" / "noisy.jpg"
    noisy.parent.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (150, 200, 3), dtype=np.uint8)).save(noisy, quality=95)
    wide = gray_image(tmp_path / "images" / "wide.jpg", 400, 300)
    assert wide.stat().st_size < 10_000 < noisy.stat().st_size
    settings = {"data.max_file_bytes": 10_000, "data.max_image_pixels": 100_000}
    folder = write_results(tmp_path / "results", [ok_row(noisy), ok_row(wide, width=400, height=300)], settings=settings)
    report.main([folder, "--out", str(tmp_path / "report")])
    assert capsys.readouterr().err.splitlines() == [
        f"ray-detect report: {noisy}: no preview: ImageError: file is over data.max_file_bytes=10000 bytes",
        f"ray-detect report: {wide}: no preview: ImageError: 400x300 is 120000 pixels, over data.max_image_pixels=100000",
    ]
    assert previews_in((tmp_path / "report" / "index.html").read_text()) == []


def test_index_holds_the_exact_counts(results_dir, tmp_path, capsys):
    report.main([results_dir, "--out", str(tmp_path / "report")])
    assert capsys.readouterr().out == f"ray-detect report: 3 previews; open {tmp_path / 'report' / 'index.html'}\n"
    page = (tmp_path / "report" / "index.html").read_text()
    for key, value in {"images": 5, "ok": 3, "errors": 2, "detections": 6}.items():
        assert f'<dd id="{key}">{value}</dd>' in page
    by_label = re.findall(r'<tr><td>([a-z]+)</td><td class="n">(\d+)</td>', page)
    assert by_label == [("cat", "3"), ("dog", "2"), ("person", "1")]
    histogram = re.findall(r'<tr><td>(\d\.\d)–\d\.\d</td><td class="n">(\d+)</td>', page)
    assert histogram == [("0.0", "0"), ("0.1", "0"), ("0.2", "0"), ("0.3", "0"), ("0.4", "1"),
                         ("0.5", "1"), ("0.6", "0"), ("0.7", "1"), ("0.8", "0"), ("0.9", "3")]
    errors = re.findall(r"<tr><td>([^<]+)</td><td>([a-z_]+)</td><td>([^<]*)</td></tr>", page)
    assert errors == [
        (str(tmp_path / "images" / "broken.png"), "not_an_image", "not a recognised image format"),
        (str(tmp_path / "images" / "huge.tif"), "too_large", "file is 99 bytes, over data.max_file_bytes=10"),
    ]
    assert "<h2>Previews (3)</h2>" in page and len(previews_in(page)) == 3
    assert sorted(os.listdir(tmp_path / "report" / "previews")) == ["0001_a.jpg", "0002_b.jpg", "0003_c.jpg"]


def test_the_last_runs_pace_and_cost_come_from_the_manifest(tmp_path):
    """The Last run list: the manifest's figures of the last run, formatted, and none where the manifest has
    none (a CPU run has no GPU figures; the fixture's manifest, like an older run's, has no last run)."""
    rows = [ok_row(gray_image(tmp_path / "images" / "a.jpg"), [(17, "cat", 0.95, [40, 30, 160, 120])])]
    last_run = {
        "wall_seconds": 123.456, "images_per_second": 8.1,
        "detector_by_last_run": {"actors": 2, "nodes": 1, "gpus": 1.0, "devices": {"cuda:NVIDIA H100": 2}},
        "model_batches_by_last_run": {"batch_size": 8, "batches": 4, "mean_images": 7.25, "by_images": {"5": 1, "8": 3}},
        "cost_by_last_run": {"model_seconds": 18.5, "model_busy_share": 0.7493, "device_busy_share": 0.523,
                             "images_per_gpu_second": 0.432, "gpu_hour_price": 3.0, "per_million_images": 1607.4219},
    }
    results = write_results(tmp_path / "results", rows, manifest_extra=last_run)
    report.main([results, "--out", str(tmp_path / "report")])
    page = (tmp_path / "report" / "index.html").read_text()
    items = re.findall(r'<dt>([^<]+)</dt><dd id="([a-z-]+)">([^<]+)</dd>', page.split('<dl class="counts" id="last-run">')[1])
    assert items == [
        ("wall time", "wall-seconds", "123.5 s"), ("images/s", "images-per-second", "8.10"),
        ("detector actors", "actors", "2"), ("GPUs held", "gpus", "1"), ("images per model batch", "mean-batch", "7.25 of 8"),
        ("actors&#x27; time in model calls", "model-busy", "75%"), ("GPUs busy in model calls", "device-busy", "52%"),
        ("images/s per GPU", "images-per-gpu-second", "0.43"), ("cost per million images", "cost-per-million", "1607.42"),
    ]
    on_cpu = {**last_run, "detector_by_last_run": {"actors": 1, "nodes": 1, "gpus": 0.0, "devices": {"cpu": 1}},
              "cost_by_last_run": {"model_seconds": 9.0, "model_busy_share": 0.5, "device_busy_share": None,
                                   "images_per_gpu_second": None, "gpu_hour_price": None, "per_million_images": None}}
    results = write_results(tmp_path / "cpu-results", rows, manifest_extra=on_cpu)
    report.main([results, "--out", str(tmp_path / "cpu-report")])
    page = (tmp_path / "cpu-report" / "index.html").read_text()
    assert re.findall(r'<dd id="([a-z-]+)">', page.split('id="last-run">')[1]) == [
        "wall-seconds", "images-per-second", "actors", "gpus", "mean-batch", "model-busy"]
    report.main([write_results(tmp_path / "old", rows), "--out", str(tmp_path / "old-report")])
    assert 'id="last-run"' not in (tmp_path / "old-report" / "index.html").read_text()


def test_filters_choose_the_previews(results_dir, tmp_path):
    report.main([results_dir, "--out", str(tmp_path / "dogs"), "--label", "dog"])
    page = (tmp_path / "dogs" / "index.html").read_text()
    assert previews_in(page) == ["previews/0001_a.jpg", "previews/0002_c.jpg"]
    assert '<dd id="detections">6</dd>' in page  # counts still cover the whole directory
    report.main([results_dir, "--out", str(tmp_path / "two"), "--sample", "2", "--seed", "3"])
    assert len(previews_in((tmp_path / "two" / "index.html").read_text())) == 2
    report.main([results_dir, "--out", str(tmp_path / "errors"), "--errors-only"])
    page = (tmp_path / "errors" / "index.html").read_text()
    assert previews_in(page) == [] and "<h2>Previews (2)</h2>" in page
    assert page.count('<div class="problem">') == 2
    assert '<div class="problem">too_large: file is 99 bytes, over data.max_file_bytes=10</div>' in page


def test_the_sample_is_chosen_by_the_seed(tmp_path):
    """--sample 3 of ten images: the same --seed picks the same three, another seed another three. The
    lists are random.Random(seed).sample's picks, which Python does not promise to keep across versions:
    a new Python may need them written again."""
    images = [gray_image(tmp_path / "images" / f"img{i}.jpg", 40, 30) for i in range(10)]
    results = write_results(tmp_path / "results", [ok_row(image, width=40, height=30) for image in images])

    def previews(seed: int, out: str) -> list[str]:
        report.main([results, "--out", str(tmp_path / out), "--sample", "3", "--seed", str(seed)])
        return previews_in((tmp_path / out / "index.html").read_text())

    assert previews(3, "first") == previews(3, "again") == [
        "previews/0001_img2.jpg", "previews/0002_img3.jpg", "previews/0003_img8.jpg"]
    assert previews(4, "other") == ["previews/0001_img1.jpg", "previews/0002_img3.jpg", "previews/0003_img4.jpg"]


def test_results_images_and_report_behind_uris(tmp_path):
    memory = fsspec.filesystem("memory")
    with memory.open("/report-test/images/x.jpg", "wb") as stream:
        stream.write(gray_image(tmp_path / "x.jpg").read_bytes())
    filesystem = pafs.PyFileSystem(pafs.FSSpecHandler(memory))
    rows = [ok_row("memory:///report-test/images/x.jpg", [(17, "cat", 0.8, [40, 30, 160, 120])])]
    write_results("/report-test/results", rows, filesystem=filesystem)
    report.main(["memory:///report-test/results", "--out", "memory:///report-test/report"])
    page = memory.cat_file("/report-test/report/index.html").decode()
    assert '<dd id="detections">1</dd>' in page and previews_in(page) == ["previews/0001_x.jpg"]
    with memory.open("/report-test/report/previews/0001_x.jpg", "rb") as stream:
        assert close(np.asarray(Image.open(stream))[100, 41], report.label_color(17))


def run_command(module, *args):
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
@pytest.mark.parametrize("module", ["app.report", "app.export", "app.evaluate"])
def test_missing_results_directory_is_one_line(module, tmp_path):
    extra = {"app.report": ["--out", "r"], "app.export": ["--format", "coco", "--out", "x.json"],
             "app.evaluate": ["--ground-truth", str(tmp_path)]}[module]
    result = run_command(module, str(tmp_path / "nope"), *extra)
    command = module.split(".")[1]
    assert result.returncode == 2
    assert result.stderr == f"ray-detect {command}: error: results directory {tmp_path / 'nope'} does not exist\n"
    assert result.stdout == ""


def test_directory_without_manifest_is_one_line(tmp_path, capsys):
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "part-0.parquet").write_bytes(b"x")
    with pytest.raises(SystemExit) as exit:
        report.main([str(tmp_path / "half"), "--out", str(tmp_path / "r")])
    assert exit.value.code == 2
    assert capsys.readouterr().err == (
        f"ray-detect report: error: {tmp_path / 'half'} has no _manifest.json: "
        "not the output of a finished `python -m app` run\n"
    )
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "args,message",
    [
        (["--min-score", "2"], "--min-score 2 must be between 0 and 1"),
        (["--errors-only", "--label", "cat"], "--errors-only cannot be combined with --label or --min-score"),
        (["--sample", "x"], "argument --sample: invalid int value: 'x'"),
    ],
)
def test_bad_options_are_one_line(results_dir, tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit:
        report.main([results_dir, "--out", str(tmp_path / "r"), *args])
    assert exit.value.code == 2
    assert capsys.readouterr().err == f"ray-detect report: error: {message}\n"


@pytest.fixture
def s3_bucket(monkeypatch):
    """An S3 bucket on a local moto server, reached through the standard AWS settings."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    for key, value in {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "test",
                       "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    client = boto3.client("s3")
    client.create_bucket(Bucket="report-results")
    yield client
    server.stop()


@pytest.mark.slow
def test_results_images_and_report_on_s3(s3_bucket, tmp_path):
    from app.storage import resolve

    s3_bucket.put_object(Bucket="report-results", Key="photos/x.jpg", Body=gray_image(tmp_path / "x.jpg").read_bytes())
    rows = [ok_row("s3://report-results/photos/x.jpg", [(17, "cat", 0.8, [40, 30, 160, 120])]),
            error_row("s3://report-results/photos/y.png", "empty_file", "file is empty")]
    write_results("report-results/run-1", rows, filesystem=resolve("s3://report-results").filesystem)
    report.main(["s3://report-results/run-1", "--out", "s3://report-results/report"])
    page = s3_bucket.get_object(Bucket="report-results", Key="report/index.html")["Body"].read().decode()
    assert '<dd id="ok">1</dd>' in page and '<dd id="errors">1</dd>' in page
    assert previews_in(page) == ["previews/0001_x.jpg"]
    preview = s3_bucket.get_object(Bucket="report-results", Key="report/previews/0001_x.jpg")["Body"].read()
    assert close(np.asarray(Image.open(io.BytesIO(preview)))[100, 41], report.label_color(17))
