"""Where a run's inputs come from, through the whole pipeline on a local Ray instance: odd trees, a tree
listed in parts by Ray tasks (with resume after a crash), and manifests (each local format through the
input stage, which is all that differs between them)."""

import gzip
import os

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from app import inventory, listing
from app.config import ConfigError
from app.detector import Detector
from app.inputs import open_inputs
from app.output.dataset import MANIFEST_NAME
from app.pipeline import run
from app.config import compose_config
from tests.support.images import jpeg_bytes, odd_tree, write_images
from tests.support.models import FAST_MODEL, assert_detections, model_detections

pytestmark = pytest.mark.slow  # runs on Ray


def rows_of(path):
    return {row["path"]: row for row in pads.dataset(str(path), format="parquet").to_table().to_pylist()}


def test_an_odd_tree_gives_one_row_per_entry_and_a_rerun_adds_nothing(local_ray, tmp_path):
    odd_tree(tmp_path / "in")
    (tmp_path / "in" / os.fsdecode(b"bad\xffutf8.jpg")).write_bytes(jpeg_bytes(30, 20))
    overrides = [*FAST_MODEL, f"data.path={tmp_path / 'in'}", f"output.path={tmp_path / 'out'}", "data.max_error_fraction=1"]  # nearly all are errors
    summary = run(compose_config(overrides))
    rows = {path[len(str(tmp_path / "in")) + 1 :]: row for path, row in rows_of(tmp_path / "out").items()}
    assert {name: row["error_kind"] for name, row in rows.items()} == {
        "100%.jpg": "not_an_image",
        "bad%FFutf8.jpg": None,  # opened by its bytes, decoded
        "dangling.jpg": "unreadable",
        "dir.jpg": "not_a_file",
        "dir.jpg/in_dir.jpg": "not_an_image",
        "good.jpg": "not_an_image",
        "loop.jpg": "unreadable",
        "pipe.jpg": "not_a_file",
        "sub/inner.png": "not_an_image",
    }
    assert (rows["bad%FFutf8.jpg"]["width"], rows["bad%FFutf8.jpg"]["height"]) == (30, 20)
    assert {name: row["num_detections"] for name, row in rows.items() if row["error_kind"] is None} == {"bad%FFutf8.jpg": 3}
    assert (summary.inputs, summary.processed, summary.ok) == (9, 9, 1)
    assert summary.errors_by_kind == {"not_a_file": 2, "not_an_image": 4, "unreadable": 2}
    again = run(compose_config(overrides))
    assert (again.inputs, again.processed, again.errors) == (9, 0, 8)


def test_a_tree_listed_in_parts_resumes_after_a_crash_exactly_once(local_ray, tmp_path, monkeypatch):
    monkeypatch.setattr(listing, "DRIVER_LISTING_ENTRIES", 2)  # the driver lists 2 entries, tasks the rest
    expected = set()
    for folder in "abc":
        expected |= {str(path) for path in write_images(tmp_path / "in" / folder, 3)}
    (tmp_path / "in" / "a" / "notes.txt").write_text("not an input")
    overrides = [*FAST_MODEL, f"data.path={tmp_path / 'in'}", f"output.path={tmp_path / 'out'}", "output.rows_per_file=3"]
    first = run(compose_config(overrides))
    assert set(rows_of(tmp_path / "out")) == expected
    assert (first.inputs, first.processed, first.ok) == (9, 9, 9)
    assert listing.list_inputs(str(tmp_path / "in"), ["jpg"]).parts  # it was listed in parts

    parts = sorted(p for p in (tmp_path / "out").iterdir() if p.name.startswith("part-"))
    lost = set(pq.read_table(parts[1]).column("path").to_pylist())
    parts[1].unlink()  # the state a crash leaves: a file's rows not committed, no manifest
    (tmp_path / "out" / MANIFEST_NAME).unlink()
    write_images(tmp_path / "in" / "d", 1)  # and an image added since
    second = run(compose_config(overrides))
    assert (second.inputs, second.processed) == (10, len(lost) + 1)
    table = pads.dataset(str(tmp_path / "out"), format="parquet").to_table()
    assert sorted(table.column("path").to_pylist()) == sorted(expected | {str(tmp_path / "in" / "d" / "img_000.jpg")})
    assert table.column("num_detections").to_pylist() == [3] * 10


def manifest_inputs(tmp_path):
    """Three images, a path that does not exist and a text file, as a manifest lists them."""
    images = [str(path) for path in write_images(tmp_path / "images", 3)]
    (tmp_path / "images" / "notes.txt").write_text("-")
    return images + [str(tmp_path / "images" / "gone.jpg"), str(tmp_path / "images" / "notes.txt")]


def write_parquet(tmp_path, paths):
    target = tmp_path / "list.parquet"
    pq.write_table(pa.table({"path": paths, "size": [os.path.getsize(p) if os.path.exists(p) else 0 for p in paths]}), target)
    return target


def write_csv_with_header(tmp_path, paths):
    target = tmp_path / "list.csv"
    pacsv.write_csv(pa.table({"path": paths}), target)
    return target


def write_gzipped_csv_without_header(tmp_path, paths):
    target = tmp_path / "list.csv.gz"
    target.write_bytes(gzip.compress("".join(f"{p},{os.path.getsize(p) if os.path.exists(p) else 0}\n" for p in paths).encode()))
    return target


def test_a_manifest_gives_one_row_per_listed_image(local_ray, tmp_path):
    """The whole pipeline on a manifest (a gzipped CSV without a header; the Parquet manifest runs it in
    the resume test below, and every format gives the same input rows: the test after this one); run again,
    it finds every input with its row before any detector actor is built."""
    paths = manifest_inputs(tmp_path)
    manifest = write_gzipped_csv_without_header(tmp_path, paths)
    overrides = [*FAST_MODEL, f"data.manifest={manifest}", "data.path=/nonexistent", f"output.path={tmp_path / 'out'}"]
    built = tmp_path / "detectors-built"

    class CountedDetector(Detector):
        """The app's detector, leaving a line in `built` (on this machine's disk) each time an actor builds it."""

        def __init__(self, *args, **kwargs):
            with open(built, "a") as file:
                file.write("built\n")
            super().__init__(*args, **kwargs)

    summary = run(compose_config(overrides), detector=CountedDetector)
    rows = rows_of(tmp_path / "out")
    assert {path: row["error_kind"] for path, row in rows.items()} == {**dict.fromkeys(paths[:3]), paths[3]: "unreadable"}
    assert [rows[path]["num_detections"] for path in paths[:4]] == [3, 3, 3, 0]  # the text file has no row
    assert (summary.inputs, summary.processed, summary.ok) == (4, 4, 3)
    assert built.read_text().splitlines() == ["built"] * summary.detector_actors
    # Nothing left: the streamed inputs are read up to the end before the detector stage, which never starts.
    built.unlink()
    again = run(compose_config(overrides), detector=CountedDetector)
    assert (again.inputs, again.processed, again.detector_actors, built.exists()) == (4, 0, 0, False)


@pytest.mark.parametrize("write", [write_parquet, write_csv_with_header, write_gzipped_csv_without_header])
def test_each_manifest_format_gives_the_same_input_rows(local_ray, tmp_path, write):
    """The input stage the pipeline runs on a manifest (app.inputs: the manifest read by Ray tasks,
    turned into input rows), in each local format: the same local image paths and no error yet (the
    missing file fails when read, the text file is left out); the sizes the manifest lists, none where it
    lists none. The rest of the pipeline sees only these rows, so each format's run is the one above."""
    paths = manifest_inputs(tmp_path)
    manifest = write(tmp_path, paths)
    cfg = compose_config([*FAST_MODEL, f"data.manifest={manifest}", "data.path=/nonexistent", f"output.path={tmp_path / 'out'}"])
    inputs = open_inputs(cfg.data)
    assert inputs.table is None and inputs.source.uri_prefix == ""  # streamed, local paths
    rows = sorted(inputs.stream(cfg.data, tasks=1).take_all(), key=lambda row: paths.index(row["path"]))
    listed_sizes = write is not write_csv_with_header
    sizes = [os.path.getsize(path) for path in paths[:3]] + [0]
    assert [(row["path"], row["size"], row["error_kind"], row["error"]) for row in rows] == [
        (path, size if listed_sizes else None, None, None) for path, size in zip(paths[:4], sizes)]


def test_a_manifest_without_a_path_column_is_refused_before_work(tmp_path):
    pq.write_table(pa.table({"file": ["a.jpg"]}), tmp_path / "list.parquet")
    with pytest.raises(ConfigError, match=r"^data.manifest \S+list.parquet has no `path` column \(columns: file\)$"):
        run(compose_config([*FAST_MODEL, f"data.manifest={tmp_path / 'list.parquet'}", f"output.path={tmp_path / 'out'}"]))


def test_a_manifest_run_resumes_after_a_crash_exactly_once(local_ray, tmp_path):
    paths = [str(path) for path in write_images(tmp_path / "images", 9)]
    manifest = write_parquet(tmp_path, paths)
    overrides = [*FAST_MODEL, f"data.manifest={manifest}", f"output.path={tmp_path / 'out'}", "output.rows_per_file=3"]
    run(compose_config(overrides))
    parts = sorted(p for p in (tmp_path / "out").iterdir() if p.name.startswith("part-"))
    lost = set(pq.read_table(parts[0]).column("path").to_pylist())
    parts[0].unlink()  # the state a crash leaves: a file's rows not committed, no manifest
    (tmp_path / "out" / MANIFEST_NAME).unlink()
    summary = run(compose_config(overrides))
    assert (summary.inputs, summary.processed) == (9, len(lost)) and len(lost) == 3
    table = pads.dataset(str(tmp_path / "out"), format="parquet").to_table()
    assert sorted(table.column("path").to_pylist()) == sorted(paths)
    assert_detections({row["path"]: row for row in table.to_pylist()}, model_detections(compose_config(overrides), paths))


def test_manifest_rows_take_relative_paths_from_its_folder_and_refuse_other_filesystems(tmp_path):
    """The manifest UDF called in-process on a CSV whose first path is local."""
    (tmp_path / "lists").mkdir()
    pacsv.write_csv(pa.table({"path": ["/abs/a.jpg", "rel/b.PNG", "s3://bucket/c.jpg", "notes.txt"], "size": [1, 2, 3, 4]}),
                    tmp_path / "lists" / "images.csv")
    manifest = inventory.open_manifest(str(tmp_path / "lists" / "images.csv"))
    assert (manifest.format, manifest.csv_columns, manifest.images.uri_prefix) == ("csv", None, "")
    batch = pacsv.read_csv(tmp_path / "lists" / "images.csv")
    rows = inventory.manifest_rows(batch, manifest=manifest, suffixes=listing.image_suffixes(["jpg", "png"])).to_pylist()
    assert [(row["path"], row["size"], row["error_kind"]) for row in rows] == [
        ("/abs/a.jpg", 1, None), (f"{tmp_path}/lists/rel/b.PNG", 2, None), ("s3://bucket/c.jpg", None, "unreadable")]
    assert rows[2]["error"] == "not on the filesystem of the manifest's first path (local)"


def test_a_manifest_listing_no_images_is_a_config_error_after_reading_it(local_ray, tmp_path):
    pq.write_table(pa.table({"path": [str(tmp_path / "a.txt"), str(tmp_path / "b.pdf")]}), tmp_path / "list.parquet")
    with pytest.raises(ConfigError, match=rf"^data.manifest {tmp_path}/list.parquet lists no image files \(extensions: jpg, "):
        run(compose_config([*FAST_MODEL, f"data.manifest={tmp_path / 'list.parquet'}", f"output.path={tmp_path / 'out'}"]))
