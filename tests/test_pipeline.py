"""The whole job on a local Ray instance: one row per input with the documented schema, the manifest,
and the command line a user runs."""

import hashlib
import json
import os
import subprocess
import sys

import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from app.config import SAMPLES_DIR, ConfigError
from app.model import ModelSpec
from app.output import dataset
from app.output.dataset import LEASE_DIR, MANIFEST_NAME, SETTINGS_NAME
from app.result_schema import RESULT_SCHEMA
from app.pipeline import TooManyErrors, run
from app.storage import resolve
from app.config import compose_config
from tests.support.images import gradient_jpeg, write_images, write_mixed_inputs
from tests.support.models import FAST_MODEL, LIGHT_CHECKPOINT, assert_detections, model_detections

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_results(path):
    return pads.dataset(str(path), format="parquet").to_table()


def test_end_to_end_one_row_per_input(local_ray, tmp_path):
    images = write_images(tmp_path / "in", 5)
    (tmp_path / "in" / "nested").mkdir()
    write_images(tmp_path / "in" / "nested", 2)
    (tmp_path / "in" / "broken.png").write_bytes(b"not a png")
    (tmp_path / "in" / "notes.txt").write_text("ignored")
    cfg = compose_config(
        [*FAST_MODEL, f"data.path={tmp_path / 'in'}", f"output.path={tmp_path / 'out'}", "inference.batch_size=3"]
    )
    summary = run(cfg)

    table = read_results(tmp_path / "out")
    assert table.schema == RESULT_SCHEMA
    paths = table.column("path").to_pylist()
    assert len(paths) == 8 and len(set(paths)) == 8
    assert set(paths) == {str(p) for p in images} | {
        str(tmp_path / "in" / "nested" / f"img_{i:03d}.jpg") for i in range(2)
    } | {str(tmp_path / "in" / "broken.png")}
    rows = {row["path"]: row for row in table.to_pylist()}
    assert rows[str(tmp_path / "in" / "broken.png")]["error_kind"] == "not_an_image"
    assert all(row["error"] is None and (row["width"], row["height"]) == (96, 72) for p, row in rows.items() if p.endswith(".jpg"))
    assert (summary.inputs, summary.processed, summary.ok, summary.errors) == (8, 8, 7, 1)
    assert summary.errors_by_kind == {"not_an_image": 1}
    assert summary.detections == sum(table.column("num_detections").to_pylist()) == 7 * 3
    ok = [path for path in rows if path.endswith(".jpg")]
    assert_detections({path: rows[path] for path in ok}, model_detections(cfg, ok))

    manifest = json.loads((tmp_path / "out" / MANIFEST_NAME).read_text())
    assert manifest["counts"] == {
        "inputs": 8, "ok": 7, "errors": 1, "detections": summary.detections, "errors_by_kind": {"not_an_image": 1}
    }
    assert manifest["model"] == {"name": "fasterrcnn_mobilenet_v3_large_320_fpn", "weights": str(LIGHT_CHECKPOINT),
                                 "weights_sha256": hashlib.sha256(LIGHT_CHECKPOINT.read_bytes()).hexdigest(),
                                 "random_init_fallback": None}
    assert manifest["config"]["data"]["path"] == str(tmp_path / "in")
    assert set(manifest["versions"]) == {"app", "ray", "torch", "torch_cuda", "torchvision"}
    assert (manifest["complete"], manifest["max_error_fraction_exceeded"], manifest["processed_by_last_run"]) == (True, False, 8)
    # Readers see one dataset: data files at the top, nothing staged left behind.
    entries = sorted(os.listdir(tmp_path / "out"))
    assert entries == [LEASE_DIR, MANIFEST_NAME, SETTINGS_NAME, "part-g0000000001-000000.parquet"]
    assert os.listdir(tmp_path / "out" / LEASE_DIR) == ["0000000001.json"]  # the run's lease, released
    assert pq.ParquetDataset(str(tmp_path / "out")).read().num_rows == 8


def test_refuses_an_output_path_holding_other_files_and_overwrites_only_what_runs_wrote(local_ray, tmp_path):
    """A folder of somebody else's files is refused, with output.overwrite=true too; so is an overwrite of an
    output that holds the run's inputs. Overwriting a ray-detect output deletes what runs wrote there and
    nothing else."""
    write_images(tmp_path / "in", 1)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "old.parquet").write_bytes(b"x")
    for overwrite, message in (("false", "holds files that are not ray-detect results; choose another output.path"),
                               ("true", "is not a ray-detect output (it has no _settings.json): output.overwrite=true "
                                        "replaces only results; choose another output.path")):
        with pytest.raises(ConfigError) as caught:
            run(compose_config([*FAST_MODEL, f"data.path={tmp_path / 'in'}", f"output.path={tmp_path / 'other'}",
                                f"output.overwrite={overwrite}"]))
        assert str(caught.value) == f"output.path {tmp_path / 'other'} {message}"
    assert sorted(path.name for path in (tmp_path / "other").iterdir()) == ["old.parquet"]

    overrides = [*FAST_MODEL, f"data.path={tmp_path / 'in'}", f"output.path={tmp_path / 'out'}"]
    assert run(compose_config(overrides)).processed == 1
    (tmp_path / "out" / "notes.txt").write_text("the team's notes")
    (tmp_path / "out" / "images").mkdir()
    write_images(tmp_path / "out" / "images", 2)
    with pytest.raises(ConfigError) as caught:
        run(compose_config([*FAST_MODEL, f"data.path={tmp_path / 'out' / 'images'}", f"output.path={tmp_path / 'out'}",
                            "output.overwrite=true"]))
    assert str(caught.value) == (f"data.path {tmp_path / 'out' / 'images'} lies inside output.path {tmp_path / 'out'}: "
                                 "output.overwrite=true is refused there; choose an output.path apart from the inputs")
    summary = run(compose_config([*overrides, "output.overwrite=true"]))
    assert (summary.inputs, summary.processed) == (1, 1)
    assert (tmp_path / "out" / "notes.txt").read_text() == "the team's notes"
    assert len(list((tmp_path / "out" / "images").iterdir())) == 2
    assert dataset.read_committed(resolve(str(tmp_path / "out")), ["path"]).column("path").to_pylist() == [str(tmp_path / "in" / "img_000.jpg")]


def snapshot(folder):
    """The files in folder, but the lease folder, where each run adds its own lease."""
    return {path.name: (path.stat().st_mtime_ns, path.read_bytes()) for path in sorted(folder.iterdir()) if path.name != LEASE_DIR}


def test_every_bad_and_odd_file_gives_one_row_twice_in_a_row(local_ray, tmp_path):
    expected = write_mixed_inputs(tmp_path / "in")
    overrides = [
        *FAST_MODEL, f"data.path={tmp_path / 'in'}", f"output.path={tmp_path / 'out'}",
        "data.max_file_bytes=200000", "data.max_image_pixels=4000000", "output.rows_per_file=5",
    ]
    first = run(compose_config(overrides))
    table = read_results(tmp_path / "out")
    outcome = {row["path"].rsplit("/", 1)[1]: row["error_kind"] for row in table.to_pylist()}
    assert outcome == expected
    assert table.num_rows == len(expected) == 20
    assert (first.inputs, first.processed, first.ok, first.errors) == (20, 20, 13, 7)
    assert first.errors_by_kind == {"corrupt_image": 2, "empty_file": 1, "not_an_image": 2, "too_large": 1, "too_many_pixels": 1}
    detections = {row["path"].rsplit("/", 1)[1]: row["num_detections"] for row in table.to_pylist()}
    assert detections == {name: 0 if kind else 3 for name, kind in expected.items()}
    sizes = {row["path"].rsplit("/", 1)[1]: (row["width"], row["height"]) for row in table.to_pylist()}
    assert sizes["rotated.jpg"] == (20, 40) and sizes["strip.jpg"] == (4000, 50) and sizes["dot.png"] == (1, 1)
    assert len([name for name in os.listdir(tmp_path / "out") if name.startswith("part-")]) == 4  # 5 rows per file

    before = snapshot(tmp_path / "out")
    second = run(compose_config(overrides))
    assert (second.inputs, second.processed, second.ok, second.errors) == (20, 0, 13, 7)
    assert snapshot(tmp_path / "out") == before  # no model work, nothing changed


def test_resume_processes_only_images_without_a_committed_row(local_ray, tmp_path):
    write_images(tmp_path / "in", 9)
    overrides = [*FAST_MODEL, f"data.path={tmp_path / 'in'}", f"output.path={tmp_path / 'out'}", "output.rows_per_file=3"]
    run(compose_config(overrides))
    parts = sorted(p for p in (tmp_path / "out").iterdir() if p.name.startswith("part-"))
    assert len(parts) == 3
    # The state a crash leaves: some files committed, one not, a half-written file in staging, no manifest.
    lost = set(pq.read_table(parts[1]).column("path").to_pylist())
    parts[1].unlink()
    (tmp_path / "out" / MANIFEST_NAME).unlink()
    (tmp_path / "out" / "_staging" / "dead-run").mkdir(parents=True)
    (tmp_path / "out" / "_staging" / "dead-run" / "part-dead-run-000000.parquet").write_bytes(b"PAR1half")

    summary = run(compose_config(overrides))
    assert (summary.inputs, summary.processed) == (9, 3)
    table = read_results(tmp_path / "out")
    paths = table.column("path").to_pylist()
    assert sorted(paths) == sorted(str(tmp_path / "in" / f"img_{i:03d}.jpg") for i in range(9))
    new_parts = sorted(p.name for p in (tmp_path / "out").iterdir() if p.name.startswith("part-"))
    assert len(new_parts) == 3 and parts[0].name in new_parts and parts[2].name in new_parts
    resumed = next(p for p in new_parts if p not in {parts[0].name, parts[2].name})
    assert set(pq.read_table(tmp_path / "out" / resumed).column("path").to_pylist()) == lost
    assert not (tmp_path / "out" / "_staging").exists()
    assert json.loads((tmp_path / "out" / MANIFEST_NAME).read_text())["counts"]["inputs"] == 9
    # The rows made again hold the same detections as the others: what the model gives on these pixels.
    assert_detections({row["path"]: row for row in table.to_pylist()}, model_detections(compose_config(overrides), paths))


def test_resume_after_inputs_changed_processes_the_added_image_alone_and_keeps_removed_rows(local_ray, tmp_path):
    """README: images added to data.path since are processed on the next run; rows of images removed
    since are kept."""
    images = write_images(tmp_path / "in", 5)
    added = images[4].rename(tmp_path / "added.jpg")
    overrides = [*FAST_MODEL, f"data.path={tmp_path / 'in'}", f"output.path={tmp_path / 'out'}"]
    first = run(compose_config(overrides))
    assert (first.inputs, first.processed) == (4, 4)
    before = read_results(tmp_path / "out")
    added.rename(images[4])
    images[0].unlink()

    second = run(compose_config(overrides))
    assert (second.inputs, second.processed, second.ok, second.detections) == (5, 1, 5, 15)
    rows = {row["path"]: row for row in read_results(tmp_path / "out").to_pylist()}
    assert sorted(rows) == sorted(str(path) for path in images)
    kept = {row["path"]: row for row in before.to_pylist()}
    assert rows[str(images[0])] == kept[str(images[0])]  # the removed image's row, as it was
    assert_detections({str(images[4]): rows[str(images[4])]}, model_detections(compose_config(overrides), [images[4]]))


def test_resume_with_other_settings_is_refused(local_ray, tmp_path):
    write_images(tmp_path / "in", 1)
    overrides = [*FAST_MODEL, f"data.path={tmp_path / 'in'}", f"output.path={tmp_path / 'out'}"]
    run(compose_config(overrides))
    with pytest.raises(ConfigError) as caught:
        run(compose_config([*overrides, "model.score_threshold=0.9"]))
    assert str(caught.value) == (
        f"output.path {tmp_path / 'out'} holds results made with model.score_threshold=0.0, not 0.9; "
        "choose another output.path or pass output.overwrite=true to replace them"
    )


def test_with_resize_on_cpu_false_the_model_resizes_the_original_pixels(local_ray, tmp_path):
    """inference.resize_on_cpu=false through a whole run: the bundled photos (landscape and portrait, none
    at the model's size) are decoded as they are and the model resizes them on its device. Each row holds
    what the model finds on the original pixels, which is not what it finds on pixels resized on the CPU
    (Pillow's and torch's resizing differ), and the output's settings record the choice. One image a model
    batch, as the reference computes them: a square photo batched with a landscape one is padded to its
    shape, which changes what the model finds in it."""
    photos = sorted(SAMPLES_DIR.glob("*.jpg"))
    overrides = [*FAST_MODEL, f"data.path={SAMPLES_DIR}", f"output.path={tmp_path / 'out'}", "inference.batch_size=1"]
    cfg = compose_config([*overrides, "inference.resize_on_cpu=false"])
    summary = run(cfg)
    assert (summary.inputs, summary.ok, summary.errors) == (4, 4, 0)
    rows = {row["path"]: row for row in read_results(tmp_path / "out").to_pylist()}
    on_device = model_detections(cfg, photos)
    assert_detections(rows, on_device)
    on_cpu = model_detections(compose_config(overrides), photos)
    assert [path for path in on_device if on_device[path]["scores"] != on_cpu[path]["scores"]] == [str(p) for p in photos]
    assert json.loads((tmp_path / "out" / SETTINGS_NAME).read_text())["inference.resize_on_cpu"] is False


def test_too_many_errors_fail_after_everything_is_written(local_ray, tmp_path):
    write_images(tmp_path / "in", 2)
    (tmp_path / "in" / "bad1.jpg").write_bytes(b"")
    (tmp_path / "in" / "bad2.jpg").write_bytes(b"nope")
    overrides = [*FAST_MODEL, f"data.path={tmp_path / 'in'}", f"output.path={tmp_path / 'out'}", "data.max_error_fraction=0.25"]
    with pytest.raises(TooManyErrors) as caught:
        run(compose_config(overrides))
    assert str(caught.value) == "2 of 4 images failed, over data.max_error_fraction=0.25"
    assert read_results(tmp_path / "out").num_rows == 4
    manifest = json.loads((tmp_path / "out" / MANIFEST_NAME).read_text())
    assert manifest["max_error_fraction_exceeded"] is True
    assert manifest["counts"]["errors_by_kind"] == {"empty_file": 1, "not_an_image": 1}


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["data.path={tmp}/missing"], "data.path {tmp}/missing does not exist"),
        (["data.path={tmp}/empty"], "data.path {tmp}/empty holds no image files (extensions: jpg, jpeg, png, bmp, tif, tiff, webp, gif)"),
        (["model.weights={tmp}/none.pt"], "model.weights checkpoint {tmp}/none.pt does not exist"),
        (["data.path={tmp}/empty", "output.lease_heartbeat_s=100"],
         "output.lease_heartbeat_s=100.0 must be above 0 and at most half of output.lease_timeout_s=180.0"),
        (["data.manifest={tmp}/missing.parquet"], "data.manifest {tmp}/missing.parquet does not exist"),
    ],
)
def test_config_errors_before_work(tmp_path, overrides, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("x")
    cfg = compose_config([*FAST_MODEL, f"output.path={tmp_path / 'out'}", *[o.format(tmp=tmp_path) for o in overrides]])
    with pytest.raises(ConfigError) as caught:
        run(cfg)
    assert str(caught.value) == message.format(tmp=tmp_path)
    assert not (tmp_path / "out").exists()


def run_cli(*args, cwd):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run([sys.executable, "-m", "app", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_command_line_config_error_is_one_line(tmp_path):
    result = run_cli("inference.batch_size=0", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == "ray-detect: config error: inference.batch_size=0 must be at least 1"


def test_the_driver_of_a_run_with_a_checkpoint_runs_without_torch(local_ray, tmp_path):
    """Only the detector actors need torch and torchvision (app.detector_stage): the command, attached to
    this Ray as a RayJob's driver is, with both made unimportable in its process, runs to the end; its
    manifest names the torch build the actors run (read without importing torch)."""
    import importlib.metadata

    import torch

    write_images(tmp_path / "in", 2)
    program = ("import runpy, sys\n"
               "sys.modules['torch'] = sys.modules['torchvision'] = None  # an import of either fails\n"
               "runpy.run_module('app', run_name='__main__', alter_sys=True)\n")
    result = subprocess.run([sys.executable, "-c", program, *FAST_MODEL, f"ray.address={local_ray.get_runtime_context().gcs_address}",
                             "data.path=in", "output.path=out"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ray-detect: 2 images (2 ok, 0 errors: none), 6 detections; " in result.stdout
    versions = json.loads((tmp_path / "out" / MANIFEST_NAME).read_text())["versions"]
    assert (versions["torch"], versions["torch_cuda"], versions["torchvision"]) == (
        torch.__version__, torch.version.cuda, importlib.metadata.version("torchvision"))


def test_settings_record_the_weights_used_and_an_absolute_data_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = compose_config(["data.path=photos", "model=fasterrcnn_mobilenet_v3_large_320_fpn"])
    fallback = ModelSpec(name=cfg.model.name, weights="none", score_threshold=0.5, min_size=320, max_size=640, fallback_reason="offline")
    settings = dataset.settings(cfg, fallback.weights)
    assert settings["data.path"] == str(tmp_path / "photos")
    assert (settings["model.weights"], settings["model.name"], settings["model.min_size"]) == ("none", cfg.model.name, 320)
    assert sorted(settings) == [
        "data.max_file_bytes", "data.max_image_pixels", "data.path", "inference.precision", "inference.resize_on_cpu", "model.class_names",
        "model.max_detections", "model.max_size", "model.min_size", "model.name", "model.num_classes", "model.score_threshold", "model.weights",
    ]


def test_an_output_holding_two_rows_of_a_path_is_repaired_when_resumed(local_ray, tmp_path):
    """An output an older version left with a second copy of a committed file (every path twice): the
    next run keeps one row per path and finishes, instead of failing on every resume."""
    write_images(tmp_path / "in", 3)
    overrides = [*FAST_MODEL, f"data.path={tmp_path / 'in'}", f"output.path={tmp_path / 'out'}"]
    first = run(compose_config(overrides))
    (part,) = (tmp_path / "out").glob("part-*.parquet")
    (tmp_path / "out" / "part-older-000000.parquet").write_bytes(part.read_bytes())
    assert dataset.read_committed(resolve(str(tmp_path / "out")), ["path"]).num_rows == 6
    again = run(compose_config(overrides))
    assert (first.ok, again.inputs, again.ok, again.processed) == (3, 3, 3, 0)
    paths = dataset.read_committed(resolve(str(tmp_path / "out")), ["path"]).column("path").to_pylist()
    assert sorted(paths) == sorted(str(tmp_path / "in" / f"img_{i:03d}.jpg") for i in range(3))


def test_retry_errors_reads_the_images_of_the_chosen_kinds_again_and_replaces_their_rows(local_ray, tmp_path):
    """A link whose target is missing is unreadable; once the target is restored, a plain rerun changes
    nothing (the row is a verdict), and data.retry_errors=[unreadable] reads it again: its row becomes its
    detections, the other error row stays, and every image still has exactly one row."""
    write_images(tmp_path / "in", 2)
    (tmp_path / "in" / "broken.png").write_bytes(b"not a png")
    (tmp_path / "in" / "late.jpg").symlink_to(tmp_path / "restored.jpg")
    overrides = [*FAST_MODEL, f"data.path={tmp_path / 'in'}", f"output.path={tmp_path / 'out'}"]
    first = run(compose_config(overrides))
    assert (first.inputs, first.ok, first.errors_by_kind) == (4, 2, {"not_an_image": 1, "unreadable": 1})
    (tmp_path / "restored.jpg").write_bytes(gradient_jpeg(80, 60, 7))
    assert run(compose_config(overrides)).processed == 0
    retried = run(compose_config([*overrides, "data.retry_errors=[unreadable]"]))
    assert (retried.inputs, retried.processed, retried.ok, retried.errors_by_kind) == (4, 1, 3, {"not_an_image": 1})
    rows = {row["path"]: row for row in dataset.read_committed(resolve(str(tmp_path / "out")), ["path", "error_kind", "width"]).to_pylist()}
    assert len(rows) == 4 and rows[str(tmp_path / "in" / "late.jpg")]["width"] == 80
    assert (tmp_path / "out" / MANIFEST_NAME).exists()
