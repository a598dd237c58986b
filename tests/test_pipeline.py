"""The whole job on a local Ray instance: one row per input with the documented schema, the manifest,
and the command line a user runs."""

import json
import os
import subprocess
import sys

import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from app.pipeline import ConfigError, run
from app.results import MANIFEST_NAME, RESULT_SCHEMA
from tests.conftest import FAST_MODEL, compose_config, write_images

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
    assert (summary.inputs, summary.ok, summary.errors) == (8, 7, 1)
    assert summary.errors_by_kind == {"not_an_image": 1}
    assert summary.detections == sum(table.column("num_detections").to_pylist())

    manifest = json.loads((tmp_path / "out" / MANIFEST_NAME).read_text())
    assert manifest["counts"] == {
        "inputs": 8, "ok": 7, "errors": 1, "detections": summary.detections, "errors_by_kind": {"not_an_image": 1}
    }
    assert manifest["model"] == {"name": "fasterrcnn_mobilenet_v3_large_320_fpn", "weights": "none", "random_init_fallback": None}
    assert manifest["config"]["data"]["path"] == str(tmp_path / "in")
    assert set(manifest["versions"]) == {"app", "ray", "torch", "torchvision"}
    assert manifest["resources"] == {"num_gpus": 0.0, "num_actors": 1, "num_cpus_per_actor": 1.0}
    # Readers see one dataset: data files at the top, nothing staged left behind.
    entries = sorted(os.listdir(tmp_path / "out"))
    assert entries[0] == MANIFEST_NAME and all(e.startswith("part-") and e.endswith(".parquet") for e in entries[1:])
    assert pq.ParquetDataset(str(tmp_path / "out")).read().num_rows == 8


def test_refuses_to_mix_with_existing_results(local_ray, tmp_path):
    write_images(tmp_path / "in", 1)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.parquet").write_bytes(b"x")
    cfg = compose_config([*FAST_MODEL, f"data.path={tmp_path / 'in'}", f"output.path={tmp_path / 'out'}"])
    with pytest.raises(ConfigError, match="is not empty; choose another output.path or pass output.overwrite=true"):
        run(cfg)
    summary = run(compose_config([*FAST_MODEL, f"data.path={tmp_path / 'in'}", f"output.path={tmp_path / 'out'}", "output.overwrite=true"]))
    assert summary.inputs == 1
    assert not (tmp_path / "out" / "old.parquet").exists()
    assert read_results(tmp_path / "out").num_rows == 1


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["data.path={tmp}/missing"], "data.path {tmp}/missing does not exist"),
        (["data.path={tmp}/empty"], "data.path {tmp}/empty holds no image files (extensions: jpg, jpeg, png, bmp, tif, tiff, webp, gif)"),
        (["model.weights={tmp}/none.pt"], "model.weights checkpoint {tmp}/none.pt does not exist"),
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


def test_command_line_on_a_new_folder(tmp_path):
    write_images(tmp_path / "photos", 3)
    result = run_cli(*FAST_MODEL, f"data.path={tmp_path / 'photos'}", "output.path=out", "ray.num_cpus=2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"ray-detect: 3 images (3 ok, 0 errors: none)" in result.stdout
    assert f"ray-detect: results in {tmp_path / 'out'} (manifest: {tmp_path / 'out'}/_manifest.json)" in result.stdout
    assert read_results(tmp_path / "out").num_rows == 3
    assert sorted(os.listdir(tmp_path)) == ["out", "photos"]  # Hydra wrote nothing of its own


def test_command_line_config_error_is_one_line(tmp_path):
    result = run_cli("inference.batch_size=0", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == "ray-detect: config error: inference.batch_size=0 must be at least 1"


def test_command_line_typo_names_the_key(tmp_path):
    result = run_cli("inference.batch_sise=4", cwd=tmp_path)
    assert result.returncode == 1
    assert "Could not override 'inference.batch_sise'" in result.stderr
    assert "Traceback" not in result.stderr
