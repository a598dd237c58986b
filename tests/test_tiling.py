"""Tiled detection (tiling=tiles), checked against SAHI (sahi on PyPI, the field's sliced-inference
library): its tile grid, its merging of detections (NMS and greedy NMM, IoU and IoS, per label or not),
and its sliced prediction with the same model on generated scenes, in the detector and in a run."""

import dataclasses
import itertools
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from sahi.postprocess.backends import set_postprocess_backend
from sahi.postprocess.combine import GreedyNMMPostprocess, NMSPostprocess
from sahi.predict import get_sliced_prediction
from sahi.prediction import ObjectPrediction
from sahi.slicing import get_slice_bboxes

from app import report
from app.bench.tiles import sahi_model, scene_pixels
from app.config import ConfigError, MatchMetric, MergeMethod, check_config
from app.decode import DECODED_SCHEMA, DecodeOptions, decode_images
from app.detector import Detector
from app.detector_stage import DetectorStage, image_detections, model_views
from app.listing import INPUT_SCHEMA
from app.model import build_model
from app.pipeline import model_spec, run
from app.tiling import Detections, TilingOptions, merge_detections, tile_grid
from app.config import compose_config
from tests.support.images import write_images
from tests.support.models import FAST_MODEL, model_detections

# SAHI picks its merging backend by what is installed (torchvision's on a GPU); numpy's is its reference.
set_postprocess_backend("numpy")

# The tests' model takes 320-px inputs: tiles of 320 px (tiling.tile_size's default, model.min_size).
TILE = 320
# The settings the issue compares a run with SAHI at: its NMS with IoU, and no whole-image pass.
NMS_IOU = ["tiling=tiles", "tiling.merge=nms", "tiling.match_metric=iou", "tiling.full_image=false"]


# Two scenes, a landscape and a portrait one, saved as PNG so that SAHI reads the very pixels we decode.
SCENES = {"field.png": (1100, 750, 1), "harbour.png": (700, 1000, 2)}


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("scenes")
    for name, (width, height, seed) in SCENES.items():
        Image.fromarray(scene_pixels(width, height, seed)).save(folder / name)
    return {name: folder / name for name in SCENES}


# ------------------------------------------------------------------------------------------ the grid


@pytest.mark.slow
def test_the_tile_grid_is_sahis_on_every_size():
    """Sides shorter than, equal to, one pixel over and many times a tile; overlaps from none to 0.99."""
    sizes = [1, 100, 320, 321, 640, 1000, 1999, 4000]
    for width, height, size, overlap in itertools.product(sizes, sizes[1:6], [320, 512], [0, 0.1, 0.2, 0.5, 0.75, 0.99]):
        ours = tile_grid(width, height, size, overlap).tolist()
        assert ours == get_slice_bboxes(height, width, size, size, False, overlap, overlap), (width, height, size, overlap)


def test_the_grid_of_a_landscape_scene():
    """1100 x 750 in 320-px tiles with 0.2 overlap: a step of 256, the last tile of each side moved back to
    its edge."""
    grid = tile_grid(1100, 750, 320, 0.2)
    assert sorted({x for x, _, _, _ in grid}) == [0, 256, 512, 768, 780]
    assert sorted({y for _, y, _, _ in grid}) == [0, 256, 430]
    assert len(grid) == 15 and {(x2 - x1, y2 - y1) for x1, y1, x2, y2 in grid} == {(320, 320)}
    assert tile_grid(1000, 200, 320, 0.2).tolist() == [[0, 0, 320, 200], [256, 0, 576, 200], [512, 0, 832, 200], [680, 0, 1000, 200]]


# ------------------------------------------------------------------------------------------ merging


def sahi_predictions(boxes, scores, labels, shifts) -> list[ObjectPrediction]:
    """Detections as SAHI holds them after a sliced prediction: each made on a tile, then shifted."""
    return [ObjectPrediction(bbox=box.tolist(), category_id=int(label), score=score, shift_amount=shift.tolist(),
                             full_shape=[10_000, 10_000]).get_shifted_object_prediction()
            for box, score, label, shift in zip(boxes, scores, labels, shifts)]


def random_detections(rng, count: int, tied_scores: bool):
    """Clusters of boxes (objects found by several tiles) in float32 tile pixels, the offsets of their
    tiles (multiples of 256), scores (some tied) and three labels."""
    clusters = max(1, count // 4)
    cluster = rng.integers(0, clusters, count)
    sides = rng.uniform(10, 80, (clusters, 2))[cluster] * rng.uniform(0.7, 1.3, (count, 2))
    centres = rng.uniform(40, 3000, (clusters, 2))[cluster] + rng.normal(0, 0.15, (count, 2)) * sides
    image_boxes = np.concatenate([centres - sides / 2, centres + sides / 2], axis=1).clip(0)
    shifts = (image_boxes[:, :2] // 256 * 256).astype(np.int64)
    boxes = (image_boxes - np.concatenate([shifts, shifts], axis=1)).astype(np.float32)
    scores = (rng.choice(np.linspace(0.5, 1, 7), count) if tied_scores else rng.uniform(0.3, 1, count)).astype(np.float32)
    return boxes, shifts, scores, rng.integers(1, 4, count)


@pytest.mark.slow
@pytest.mark.parametrize("merge,metric,class_aware", list(itertools.product(MergeMethod, MatchMetric, [True, False])))
def test_merging_equals_sahis_postprocess(merge, metric, class_aware):
    """On 60 random sets of up to 80 overlapping detections, at thresholds 0.3 and 0.5: the same boxes,
    scores and labels as SAHI's NMSPostprocess or GreedyNMMPostprocess, ties of scores included."""
    rng = np.random.default_rng(7)
    postprocess = NMSPostprocess if merge == MergeMethod.nms else GreedyNMMPostprocess
    merged = total = 0
    for trial in range(60):
        boxes, shifts, scores, labels = random_detections(rng, int(rng.integers(1, 80)), tied_scores=trial % 2 == 1)
        for threshold in (0.3, 0.5):
            options = TilingOptions(TILE, 0.2, False, merge, metric, threshold, class_aware)
            moved = boxes.astype(np.float64) + np.concatenate([shifts, shifts], axis=1)
            ours = merge_detections(Detections(moved, scores, labels), options)
            theirs = postprocess(match_threshold=threshold, match_metric=metric.value.upper(), class_agnostic=not class_aware)(
                sahi_predictions(boxes, scores, labels, shifts))
            assert len(ours.labels) == len(theirs), (trial, threshold)
            expected = sorted((p.score.value, p.category.id, *p.bbox.to_xyxy()) for p in theirs)
            found = sorted((float(s), int(label), *box) for box, s, label in zip(ours.boxes.tolist(), ours.scores, ours.labels))
            for want, got in zip(expected, found):
                assert got[:2] == pytest.approx(want[:2], abs=1e-6) and got[1] == want[1]
                assert np.allclose(got[2:], want[2:], rtol=0, atol=1e-3), (want, got)
            merged, total = merged + len(scores) - len(theirs), total + len(scores)
    assert merged > total / 4  # the sets overlap: many detections were merged away


def test_greedy_merging_takes_the_union_box_the_top_score_and_its_label():
    """Three boxes of one object (label 1 and 2, agnostic merge), one apart: nmm merges the three into
    their union with the top score; a candidate tied on score gives its label (SAHI's rule); nms keeps the top box."""
    boxes = np.array([[100, 100, 150, 150], [110, 105, 160, 150], [95, 100, 140, 155], [400, 400, 420, 420]], np.float64)
    scores = np.array([0.9, 0.9, 0.6, 0.7], np.float32)
    labels = np.array([1, 2, 1, 3])
    nmm = merge_detections(Detections(boxes, scores, labels), TilingOptions(TILE, 0.2, True, MergeMethod.nmm, MatchMetric.ios, 0.5, False))
    assert nmm.boxes.tolist() == [[95, 100, 160, 155], [400, 400, 420, 420]]
    assert nmm.scores.tolist() == pytest.approx([0.9, 0.7]) and nmm.labels.tolist() == [2, 3]
    nms = merge_detections(Detections(boxes, scores, labels), TilingOptions(TILE, 0.2, True, MergeMethod.nms, MatchMetric.iou, 0.5, False))
    assert nms.boxes.tolist() == [[100, 100, 150, 150], [400, 400, 420, 420]] and nms.labels.tolist() == [1, 3]


# ------------------------------------------------------------------------------------------ config


@pytest.mark.parametrize("overrides,message", [
    (["tiling.tile_size=512"], "tiling.tile_size=512 is set but tiling is off: add tiling=tiles"),
    (["tiling=tiles", "tiling.overlap=1"], "tiling.overlap=1.0 must be at least 0 and below 1"),
    (["tiling=tiles", "tiling.overlap=-0.1"], "tiling.overlap=-0.1 must be at least 0 and below 1"),
    (["tiling=tiles", "tiling.tile_size=16"], "tiling.tile_size=16 must be at least 32"),
    (["tiling=tiles", "tiling.match_threshold=1.5"], "tiling.match_threshold=1.5 must be between 0 and 1"),
    (["tiling=tiles", "tiling.full_image=null"], "tiling.full_image must be set with tiling=tiles"),
])
def test_bad_tiling_settings_fail_in_one_line(overrides, message):
    with pytest.raises(ConfigError) as caught:
        check_config(compose_config(overrides))
    assert str(caught.value) == message


def test_tiles_default_to_the_model_input_size_with_sahis_merge_and_a_higher_pixel_guard():
    cfg = compose_config(["tiling=tiles", "model=fasterrcnn_mobilenet_v3_large_320_fpn"])
    check_config(cfg)
    assert TilingOptions.from_config(cfg.tiling) == TilingOptions(320, 0.2, True, MergeMethod.nmm, MatchMetric.ios, 0.5, True)
    assert (cfg.data.max_image_pixels, cfg.data.max_file_bytes) == (250_000_000, 256 * 2**20)
    assert compose_config(["tiling=tiles", "data.max_image_pixels=1000"]).data.max_image_pixels == 1000
    plain = compose_config([])
    assert TilingOptions.from_config(plain.tiling) is None and plain.data.max_image_pixels == 40_000_000


# ------------------------------------------------------------------------------------------ decoding


def decoded(paths: list[Path], options: DecodeOptions) -> list[dict]:
    listed = pa.Table.from_pylist([dict(path=str(path), size=path.stat().st_size) for path in paths], schema=INPUT_SCHEMA)
    table = decode_images(listed, filesystem=pafs.LocalFileSystem(), uri_prefix="", options=options)
    assert table.schema == DECODED_SCHEMA
    return table.to_pylist()


def test_a_tiled_image_is_decoded_once_at_full_size_with_its_grid_and_a_small_one_as_without_tiling(scenes, tmp_path):
    small = write_images(tmp_path, 1, width=300, height=200)[0]
    tiling = TilingOptions(TILE, 0.2, True, MergeMethod.nmm, MatchMetric.ios, 0.5, True)
    field, photo = decoded([scenes["field.png"], small], DecodeOptions(2**26, 10**8, 320, 640, tiling=tiling))
    assert (field["width"], field["height"]) == (1100, 750)
    assert field["scene"] == np.array(Image.open(scenes["field.png"])).tobytes()
    assert field["tiles"] == tile_grid(1100, 750, TILE, 0.2).reshape(-1).tolist()
    # The whole-image pass at the model's input size, resized from the full-size pixels.
    assert (field["pixel_width"], field["pixel_height"]) == (469, 320) and len(field["pixels"]) == 469 * 320 * 3
    untiled = decoded([small], DecodeOptions(2**26, 10**8, 320, 640))[0]
    assert {**photo, "decode_seconds": 0} == {**untiled, "decode_seconds": 0} and photo["scene"] is None and photo["tiles"] is None
    no_whole = decoded([scenes["field.png"]], DecodeOptions(2**26, 10**8, 320, 640, tiling=dataclasses.replace(tiling, full_image=False)))[0]
    assert no_whole["pixels"] is None and no_whole["scene"] == field["scene"]


MEASURE_SCENE_DECODE = """
import sys
from app.decode import DecodeOptions, decode_into
from app.tiling import TilingOptions
from app.config import MatchMetric, MergeMethod
def status(key):
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key))
data = open(sys.argv[1], "rb").read()
options = DecodeOptions(2**28, 250_000_000, 800, 1333, tiling=TilingOptions(800, 0.2, True, MergeMethod.nmm, MatchMetric.ios, 0.5, True))
open("/proc/self/clear_refs", "w").write("5")
rss = status("VmRSS:")
row = {}
decode_into(row, data, options)
print(status("VmHWM:") - rss, row["width"], row["height"], row["scene"].size, len(row["tiles"]) // 4)
"""


@pytest.mark.slow
def test_a_48_megapixel_scene_decodes_in_under_8_bytes_a_pixel(tmp_path):
    """The bound the plan declares to Ray per decode task (app.plan.DECODE_BYTES_PER_PIXEL): Pillow's
    decoded image (4 bytes a pixel) and the scene's RGB bytes (3) are the full-size arrays; the tiles are
    cropped later, in the detector, as views. Measured by RSS in a fresh process (about 7.1)."""
    path = tmp_path / "survey.jpg"
    Image.fromarray(np.tile(scene_pixels(800, 600, 3), (10, 10, 1))).save(path, quality=90)
    result = subprocess.run([sys.executable, "-c", MEASURE_SCENE_DECODE, str(path)], capture_output=True, text=True, check=True)
    growth, width, height, scene_bytes, tiles = map(int, result.stdout.split())
    assert (width, height, scene_bytes, tiles) == (8000, 6000, 8000 * 6000 * 3, 13 * 10)
    assert growth < 8 * 48_000_000, f"{growth / 48e6:.2f} bytes a pixel"


# ------------------------------------------------------------------------------------------ against SAHI


def sahi_rows(path: Path, cfg, standard_pass: bool) -> list[tuple]:
    """SAHI's get_sliced_prediction of the image with the run's model and tiling settings, one thread."""
    spec = model_spec(cfg)
    model, _ = build_model(spec)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    sahi = sahi_model(model, spec.score_threshold, "cpu")
    assert os.environ.get("CUDA_VISIBLE_DEVICES") == visible  # SAHI's -1 for the CPU does not leak
    tiling = cfg.tiling
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            result = get_sliced_prediction(
                np.array(Image.open(path).convert("RGB")), sahi, slice_height=tiling.tile_size, slice_width=tiling.tile_size,
                overlap_height_ratio=tiling.overlap, overlap_width_ratio=tiling.overlap, perform_standard_pred=standard_pass,
                postprocess_type="NMS" if tiling.merge.value == "nms" else "GREEDYNMM", postprocess_match_metric=tiling.match_metric.value.upper(),
                postprocess_match_threshold=tiling.match_threshold, postprocess_class_agnostic=not tiling.class_aware,
                force_postprocess_type=True, verbose=0)
    finally:
        torch.set_num_threads(threads)
    return [(p.category.id, p.score.value, p.bbox.to_xyxy()) for p in result.object_prediction_list]


def assert_same_detections(row: dict, expected: list[tuple]) -> None:
    """The row holds SAHI's detections: as many, each with its label, its score within 1e-4 and its box
    within 0.05 px (the two divide pixels by 255 differently, which moves the floats a little)."""
    found = list(zip(row["labels"], row["scores"], row["boxes"]))
    assert row["num_detections"] == len(expected) == len(found)
    for label, score, box in expected:
        match = next((i for i, (other_label, other_score, other_box) in enumerate(found) if other_label == label
                      and abs(other_score - score) <= 1e-4 and np.allclose(other_box, box, rtol=0, atol=0.05)), None)
        assert match is not None, (label, score, box, found)
        found.pop(match)


def detector_rows(paths: list[Path], cfg) -> list[dict]:
    """The rows the detector makes of the decoded images, in this process (no Ray), one thread."""
    tiling = TilingOptions.from_config(cfg.tiling)
    resize = cfg.inference.resize_on_cpu
    options = DecodeOptions(cfg.data.max_file_bytes, cfg.data.max_image_pixels, cfg.model.min_size if resize else None,
                            cfg.model.max_size if resize else None, tiling=tiling)
    detector = DetectorStage(model_spec(cfg), num_threads=1, batch_size=4, tiling=tiling)
    return detector(pa.Table.from_pylist(decoded(paths, options), schema=DECODED_SCHEMA)).to_pylist()


# SAHI's NMS with IoU (the comparison) is checked on both scenes by the run's test below.
@pytest.mark.slow
@pytest.mark.parametrize("name,overrides,standard_pass", [
    ("harbour.png", ["tiling=tiles", "tiling.full_image=false"], False),  # SAHI's default merge: greedy NMM, IoS 0.5, per label
    ("field.png", ["tiling=tiles", "tiling.full_image=false", "tiling.class_aware=false", "tiling.overlap=0.4"], False),
    # With the whole-image pass resized by the model on the device, as SAHI's standard prediction is.
    ("harbour.png", ["tiling=tiles", "inference.resize_on_cpu=false"], True),
])
def test_the_detector_finds_what_sahis_sliced_prediction_finds(scenes, name, overrides, standard_pass):
    cfg = compose_config(FAST_MODEL + overrides + ["data.path=unused", "output.path=unused"])
    row, = detector_rows([scenes[name]], cfg)
    assert row["num_tiles"] == len(tile_grid(*SCENES[name][:2], TILE, cfg.tiling.overlap)) + standard_pass
    assert_same_detections(row, sahi_rows(scenes[name], cfg, standard_pass))
    # Three detections per model input before merging (model.max_detections=3); IoS merges some.
    assert 0 < row["num_detections"] <= 3 * row["num_tiles"]
    if cfg.tiling.match_metric == MatchMetric.ios:
        assert row["num_detections"] < 3 * row["num_tiles"]


@pytest.mark.slow
def test_with_the_whole_image_resized_on_the_cpu_a_tiled_row_merges_the_tiles_with_the_untiled_detections(scenes):
    """Our one deliberate difference from SAHI: by default the whole-image pass is the image resized in
    the decode task, as without tiling (SAHI has the model resize it on the device): so the row is the
    merge of the tiles' detections with the image's untiled detections."""
    field = scenes["field.png"]
    overrides = FAST_MODEL + ["data.path=unused", "output.path=unused"]
    tiled = compose_config(overrides + ["tiling=tiles"])
    row, = detector_rows([field], tiled)
    untiled, = detector_rows([field], compose_config(overrides))
    assert (row["num_tiles"], untiled["num_tiles"]) == (16, 1)
    # The tiles' detections before merging, from the detector's own steps.
    tiling = TilingOptions.from_config(tiled.tiling)
    options = DecodeOptions(tiled.data.max_file_bytes, tiled.data.max_image_pixels, tiling=dataclasses.replace(tiling, full_image=False))
    batch = pa.Table.from_pylist(decoded([field], options), schema=DECODED_SCHEMA)
    views = model_views(batch, np.array([0]), options.tiling)
    found, _ = Detector(model_spec(tiled), num_threads=1, batch_size=4, tiling=tiling).detect_batches([view.pixels for view in views])
    tiles = image_detections(views, found, tiling=None)[0]
    assert len(views) == 15 and len(tiles.labels) == 45
    joined = Detections(np.concatenate([tiles.boxes, untiled["boxes"]]), np.concatenate([tiles.scores, untiled["scores"]]).astype(np.float32),
                        np.concatenate([tiles.labels, untiled["labels"]]))
    expected = merge_detections(joined, tiling)
    assert_same_detections(row, list(zip(expected.labels.tolist(), expected.scores.tolist(), expected.boxes.tolist())))


# ------------------------------------------------------------------------------------------ a run


def test_a_tiled_run_writes_one_row_per_image_with_sahis_detections_and_resumes(scenes, tmp_path, local_ray):
    """A folder of two scenes, a photo no larger than a tile and a scene cut short: one row each; the
    scenes' detections are SAHI's, the photo's its untiled ones, the cut scene an error row of no tiles.
    A rerun has nothing to do; other tiling settings on the same output are refused in one line."""
    folder = tmp_path / "in"
    folder.mkdir()
    for name, path in scenes.items():
        (folder / name).write_bytes(path.read_bytes())
    photo = write_images(folder, 1, width=300, height=200)[0]
    (folder / "broken.png").write_bytes(scenes["field.png"].read_bytes()[:5000])  # a scene cut short
    overrides = FAST_MODEL + NMS_IOU + [f"data.path={folder}", f"output.path={tmp_path / 'out'}"]
    summary = run(compose_config(overrides))
    assert (summary.inputs, summary.ok, summary.errors) == (4, 3, 1)
    rows = {Path(row["path"]).name: row for row in pq.read_table(tmp_path / "out").to_pylist()}
    assert sorted(rows) == ["broken.png", "field.png", "harbour.png", photo.name]
    cfg = compose_config(overrides)
    for name, path in scenes.items():
        assert rows[name]["num_tiles"] == len(tile_grid(*SCENES[name][:2], TILE, 0.2))
        assert_same_detections(rows[name], sahi_rows(path, cfg, standard_pass=False))
    untiled = model_detections(cfg, [photo])[str(photo)]
    assert rows[photo.name]["num_tiles"] == 1 and np.allclose(rows[photo.name]["boxes"], untiled["boxes"], rtol=0, atol=0.01)
    assert (rows["broken.png"]["error_kind"], rows["broken.png"]["num_tiles"]) == ("corrupt_image", 0)
    assert run(compose_config(overrides)).processed == 0
    # The report reads the scenes under the run's limits (250 MP with tiling) and draws their boxes.
    report.main([str(tmp_path / "out"), "--out", str(tmp_path / "report")])
    previews = sorted((tmp_path / "report" / report.PREVIEW_DIR).iterdir())
    assert len(previews) == 3 and max(Image.open(previews[0]).size) == 800
    with pytest.raises(ConfigError) as caught:
        run(compose_config(overrides + ["tiling.overlap=0.3"]))
    assert str(caught.value) == (f"output.path {tmp_path / 'out'} holds results made with tiling.overlap=0.2, not 0.3; "
                                 "choose another output.path or pass output.overwrite=true to replace them")
