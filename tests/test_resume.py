"""What an output holds, counted without the driver holding its paths (app.output.resume), and the
refusal to resume one made with other settings; called in-process, without Ray."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from app.config import ConfigError
from app.output import dataset
from app.output.dataset import LEASE_DIR
from app.result_schema import RESULT_SCHEMA
from app.output.resume import contains, digests, scan_output
from app.pipeline import model_spec, run
from app.storage import resolve
from app.config import compose_config
from tests.support.images import write_images


def committed_file(path, rows):
    columns = {name: [row.get(name) for row in rows] for name in RESULT_SCHEMA.names}
    for name in ("boxes", "scores", "labels", "label_names"):
        columns[name] = [[] for _ in rows]
    pq.write_table(pa.table(columns, schema=RESULT_SCHEMA), path)


def test_scan_counts_rows_paths_errors_and_detections(tmp_path):
    committed_file(tmp_path / "part-a-000000.parquet", [
        dict(path="s3://b/1.jpg", num_detections=3), dict(path="s3://b/2.jpg", num_detections=0, error_kind="unreadable")])
    committed_file(tmp_path / "part-b-000000.parquet", [
        dict(path="s3://b/3.jpg", num_detections=2), dict(path="s3://b/1.jpg", num_detections=3)])  # a duplicate row
    (tmp_path / "_staging").mkdir()
    committed_file(tmp_path / "_staging" / "part-c-000000.parquet", [dict(path="s3://b/9.jpg", num_detections=1)])
    scan, index = scan_output(resolve(str(tmp_path)), in_ray=False)
    assert (scan.rows, scan.unique_keys, scan.detections, dict(scan.errors_by_kind)) == (4, 3, 8, {"unreadable": 1})
    assert list(index) == sorted(index) and len(index) == 4
    asked = digests(["s3://b/3.jpg", "s3://b/9.jpg", "s3://b/1.jpg", "3.jpg"])
    assert contains(index, asked).tolist() == [True, False, True, False]
    assert contains(index[:0], asked).tolist() == [False] * 4


def snapshot(folder) -> dict:
    """Every entry under folder but the lease folder (where each run adds its lease): its relative path and,
    for a file, its bytes."""
    return {str(path.relative_to(folder)): path.read_bytes() if path.is_file() else None for path in sorted(folder.rglob("*"))
            if path.relative_to(folder).parts[0] != LEASE_DIR}


def no_ray(*args, **kwargs):
    raise AssertionError("the run went on to start Ray")


@pytest.mark.parametrize(
    "change, key, before, after",
    [
        ({"data.path": "{tmp}/other"}, "data.path", "{tmp}/photos", "{tmp}/other"),
        ({"model": "fasterrcnn_resnet50_fpn"}, "model.name", "fasterrcnn_mobilenet_v3_large_fpn", "fasterrcnn_resnet50_fpn"),
        ({"model.score_threshold": "0.3"}, "model.score_threshold", 0.5, 0.3),
        ({"inference.precision": "bf16"}, "inference.precision", "fp32", "bf16"),
    ],
    ids=["data-path", "model", "score-threshold", "precision"],
)
def test_a_run_refuses_to_resume_an_output_made_with_other_settings(change, key, before, after, tmp_path, monkeypatch):
    """README (Resume: settings must match): app.pipeline.run on an output.path whose _settings.json holds
    other settings raises ConfigError naming the first key that differs, from app.output.dataset.prepare,
    and changes nothing there. The first run's settings are written as a run writes them
    (dataset.settings, then dataset.prepare), with a committed file beside them. The models here have
    the same input size, so that the name is the key that differs. app.pipeline.connect_ray is replaced
    by a guard that fails the test: the refusal must come before Ray starts, and nothing here may start it."""
    write_images(tmp_path / "photos", 2)
    write_images(tmp_path / "other", 1)
    settings = {"data.path": f"{tmp_path}/photos", "output.path": f"{tmp_path}/out",
                "model": "fasterrcnn_mobilenet_v3_large_fpn", "model.weights": "none"}
    first = compose_config([f"{name}={value}" for name, value in settings.items()])
    output = dataset.locate(first.output)
    output.filesystem.create_dir(output.path)
    dataset.prepare(first.output, output, dataset.settings(first, "none"))
    committed_file(tmp_path / "out" / "part-first-000000.parquet", [dict(path=f"{tmp_path}/photos/img_000.jpg", num_detections=0)])
    held = snapshot(tmp_path / "out")
    assert sorted(held) == ["_settings.json", "part-first-000000.parquet"]
    monkeypatch.setattr("app.pipeline.connect_ray", no_ray)
    changed = {**settings, **{name: value.format(tmp=tmp_path) for name, value in change.items()}}
    with pytest.raises(ConfigError) as caught:
        run(compose_config([f"{name}={value}" for name, value in changed.items()]))
    before, after = (value.format(tmp=tmp_path) if isinstance(value, str) else value for value in (before, after))
    assert str(caught.value) == (
        f"output.path {tmp_path}/out holds results made with {key}={before!r}, not {after!r}; choose another "
        "output.path or pass output.overwrite=true to replace them"
    )
    assert snapshot(tmp_path / "out") == held
    assert not ray.is_initialized()


def test_a_checkpoint_replaced_at_the_same_path_is_refused_on_resume(tmp_path, monkeypatch):
    """README (Resume: settings must match): the first run records the SHA-256 of the checkpoint it read
    (model.weights_sha256 in _settings.json); a run whose checkpoint at the same path holds other bytes
    is refused before Ray starts, and changes nothing. The same bytes resume, with or without
    model.checkpoint_sha256 (a check, not a setting): that run goes on to start Ray, where the guard stops it.
    The checkpoint's bytes are never parsed before Ray starts, so any bytes stand for one here."""
    import hashlib

    write_images(tmp_path / "photos", 2)
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"the first checkpoint")
    first_digest = hashlib.sha256(b"the first checkpoint").hexdigest()
    overrides = [f"data.path={tmp_path}/photos", f"output.path={tmp_path}/out", "model=fasterrcnn_mobilenet_v3_large_fpn",
                 f"model.weights={weights}"]
    first = compose_config(overrides)
    spec = model_spec(first)
    output = dataset.locate(first.output)
    output.filesystem.create_dir(output.path)
    dataset.prepare(first.output, output, dataset.settings(first, spec.weights, spec.weights_sha256))
    assert json.loads((tmp_path / "out" / "_settings.json").read_text())["model.weights_sha256"] == first_digest
    held = snapshot(tmp_path / "out")
    monkeypatch.setattr("app.pipeline.connect_ray", no_ray)
    weights.write_bytes(b"another checkpoint")
    with pytest.raises(ConfigError) as caught:
        run(compose_config(overrides))
    assert str(caught.value) == (
        f"output.path {tmp_path}/out holds results made with model.weights_sha256={first_digest!r}, not "
        f"{hashlib.sha256(b'another checkpoint').hexdigest()!r}; choose another output.path or pass output.overwrite=true "
        "to replace them")
    assert snapshot(tmp_path / "out") == held
    weights.write_bytes(b"the first checkpoint")
    for check in ([], [f"model.checkpoint_sha256={first_digest}"]):
        with pytest.raises(AssertionError, match="^the run went on to start Ray$"):
            run(compose_config(overrides + check))
    assert not ray.is_initialized()


def test_listed_inputs_left_to_do_and_the_counts_before_come_from_one_read(tmp_path):
    """What a resumed run on listed inputs has left, and what its progress counts as done: the committed
    rows of listed inputs, and every committed error row (a removed image's included, as in the summary)."""
    from app.inputs import Inputs, listed_todo
    from app.listing import Listing

    (tmp_path / "out").mkdir()
    committed_file(tmp_path / "out" / "part-a-000000.parquet", [
        dict(path=f"{tmp_path}/in/1.jpg", num_detections=3),
        dict(path=f"{tmp_path}/in/2.jpg", num_detections=0, error_kind="corrupt_image"),
        dict(path=f"{tmp_path}/in/gone.jpg", num_detections=0, error_kind="unreadable")])
    found = pa.table({"path": [f"{tmp_path}/in/{name}.jpg" for name in (1, 2, 3, 4)]})
    listed = Listing(tree=None, found=found, parts=[])
    todo, before = listed_todo(Inputs(resolve(str(tmp_path / "in")), listed=listed), resolve(str(tmp_path / "out")))
    assert todo.column("path").to_pylist() == [f"{tmp_path}/in/3.jpg", f"{tmp_path}/in/4.jpg"]
    assert (before.rows, dict(before.errors_by_kind)) == (2, {"corrupt_image": 1, "unreadable": 1})
