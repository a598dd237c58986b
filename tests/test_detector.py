"""The detector (pixels in, detections out) and the detector stage (Ray Data's UDF: decoded rows in, result
rows out) called directly on small batches, with a random-init model or the tests' checkpoint."""

import itertools
import logging
import os
import threading

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pytest
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode
from torchvision.models import get_model_weights
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from app import device
from app.config import SAMPLES_DIR, MatchMetric, MergeMethod
from app.decode import model_input_size
from app.decode import DECODED_SCHEMA, DecodeOptions, decode_images
from app.detector import Detector, PixelModel, PresizedTransform, batch_padding, shape_batches
from app.detector_stage import DetectorStage, image_detections, model_views
from app.device import choose_device, nvidia_driver_version
from app.listing import list_inputs
from app.metrics import MEASUREMENT_COLUMNS
from app.model import ModelSpec, WeightsError, build_model, resolve_weights
from app.result_schema import RESULT_SCHEMA
from app.out_of_memory import SplittingRunner, is_out_of_memory
from app.output.rows import result_rows
from app.pipeline import model_spec
from app.staging import packed, to_device, unpacked
from app.tiling import TilingOptions, tile_grid
from app.config import compose_config
from tests.support.models import FAST_MODEL, light_checkpoint, model_detections

SPEC = ModelSpec(
    name="fasterrcnn_mobilenet_v3_large_320_fpn",
    weights="none",
    score_threshold=0.0,
    min_size=320,
    max_size=640,
)


def test_views_and_result_rows_scale_boxes_to_original_pixels_and_keep_every_row():
    """Hand-made detections for two images (500x375 shown to the model at 1066x800; 40x30 at 80x60)
    and one error row between them: each image one view, its boxes scaled into its original pixels."""
    batch = pa.Table.from_pylist([
        dict(path="a.jpg", width=500, height=375, pixels=bytes(1066 * 800 * 3), pixel_width=1066, pixel_height=800),
        dict(path="bad.jpg", error_kind="corrupt_image", error="cannot decode"),
        dict(path="b.jpg", width=40, height=30, pixels=bytes(80 * 60 * 3), pixel_width=80, pixel_height=60),
    ], schema=DECODED_SCHEMA)
    views = model_views(batch, np.array([0, 2]), tiling=None)
    assert [(view.row, view.pixels.shape, view.scale, view.offset) for view in views] == [
        (0, (800, 1066, 3), (500 / 1066, 375 / 800), (0, 0)), (2, (60, 80, 3), (0.5, 0.5), (0, 0))]
    found = [
        {"boxes": np.array([[106.6, 80.0, 1066.0, 800.0], [0.0, 0.0, 10.66, 8.0]], np.float32),
         "scores": np.array([0.9, 0.25], np.float32), "labels": np.array([17, 1])},
        {"boxes": np.zeros((0, 4), np.float32), "scores": np.zeros(0, np.float32), "labels": np.zeros(0, np.int64)},
    ]
    detections = image_detections(views, found, tiling=None)
    table = result_rows(batch, np.array([0, 2]), [detections[0], detections[2]], pa.array(["bg", "person"] + ["x"] * 15 + ["cat"]),
                        num_tiles=np.array([1, 0, 1]))
    assert table.schema == RESULT_SCHEMA
    rows = table.to_pylist()
    np.testing.assert_allclose(rows[0]["boxes"], [[50.0, 37.5, 500.0, 375.0], [0.0, 0.0, 5.0, 3.75]], rtol=1e-6)
    assert [row["scores"] for row in rows] == [[pytest.approx(0.9), pytest.approx(0.25)], [], []]
    assert [row["labels"] for row in rows] == [[17, 1], [], []]
    assert [row["label_names"] for row in rows] == [["cat", "person"], [], []]
    assert [row["num_detections"] for row in rows] == [2, 0, 0]
    assert [row["num_tiles"] for row in rows] == [1, 0, 1]
    assert [(row["path"], row["width"], row["error_kind"]) for row in rows] == [
        ("a.jpg", 500, None), ("bad.jpg", None, "corrupt_image"), ("b.jpg", 40, None)]
    assert [row["boxes"] for row in rows[1:]] == [[], []]


# Model sizes of Pascal-VOC-like photos: 500x375 and 480x360 (1066x800), 375x500 (800x1066),
# 500x333 (1201x800), 500x281 (1333x749).
LANDSCAPE, PORTRAIT, WIDE, WIDEST = (1066, 800), (800, 1066), (1201, 800), (1333, 749)


def test_shape_batches_keep_orientations_apart():
    sizes = [LANDSCAPE, PORTRAIT, LANDSCAPE, PORTRAIT, LANDSCAPE, LANDSCAPE, PORTRAIT, LANDSCAPE]
    assert shape_batches(sizes, 4) == [[1, 3, 6], [0, 2, 4, 5], [7]]


def test_shape_batches_mix_close_shapes_within_the_padding_bound():
    # 1088x800 and 1216x800 padded together: 1216*800*2 / (1088*800 + 1216*800) = 1.06, under 1.2.
    assert shape_batches([WIDE, LANDSCAPE], 8) == [[1, 0]]
    assert batch_padding([WIDE, LANDSCAPE]) == pytest.approx(1216 * 2 / (1088 + 1216) - 1)
    assert batch_padding([LANDSCAPE, LANDSCAPE]) == 0.0
    # 1088x800 images with a 1344x768 one pad to 1344x800: 1.18x their pixels with 3 of them, 1.198x
    # with 5, 1.203x with 6, so the 1344x768 image goes alone.
    assert shape_batches([LANDSCAPE] * 5 + [WIDEST], 8) == [[0, 1, 2, 3, 4, 5]]
    assert shape_batches([LANDSCAPE] * 6 + [WIDEST], 8) == [[0, 1, 2, 3, 4, 5], [6]]


def test_shape_batches_never_pad_more_than_the_bound():
    rng = np.random.default_rng(5)
    sizes = [tuple(int(v) for v in rng.integers(100, 1400, 2)) for _ in range(300)]
    batches = shape_batches(sizes, 8)
    assert sorted(i for batch in batches for i in batch) == list(range(300))
    for batch in batches:
        assert len(batch) <= 8
        width = max(-(-sizes[i][0] // 32) * 32 for i in batch)
        height = max(-(-sizes[i][1] // 32) * 32 for i in batch)
        own = sum(-(-sizes[i][0] // 32) * 32 * -(-sizes[i][1] // 32) * 32 for i in batch)
        assert width * height * len(batch) <= 1.2 * own


def decoded_batch(images, errors=()):
    rows = []
    for image in images:
        height, width = image.shape[:2]
        rows.append(dict(path=f"img{len(rows)}.jpg", width=width * 2, height=height * 2, pixels=image.tobytes(),
                         pixel_width=width, pixel_height=height, error_kind=None, error=None,
                         input_bytes=1000 + len(rows), decode_seconds=0.25))
    for kind in errors:
        rows.append(dict(path=f"bad{len(rows)}.jpg", width=None, height=None, pixels=None, pixel_width=None,
                         pixel_height=None, error_kind=kind, error=f"{kind} happened", input_bytes=None, decode_seconds=0.5))
    return pa.Table.from_pylist(rows, schema=DECODED_SCHEMA)


@pytest.fixture(scope="module")
def stage():
    torch.manual_seed(0)
    return DetectorStage(SPEC, num_threads=2, batch_size=2)


def reference_detections(images, spec=SPEC):
    """The torchvision model called as a user would call it on float images (no app code in between),
    one image at a time: in a batch, the padding to the largest image changes a model's detections."""
    model, _ = build_model(spec)
    with torch.inference_mode():
        outputs = [model([torch.from_numpy(image).permute(2, 0, 1).float().mul(1 / 255)])[0] for image in images]
    return [{key: value.numpy() for key, value in output.items()} for output in outputs]


@pytest.mark.slow
def test_the_stage_on_a_batch(stage):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (240, 320, 3), dtype=np.uint8), rng.integers(0, 255, (320, 200, 3), dtype=np.uint8)]
    out = stage(decoded_batch(images, errors=["corrupt_image"]))
    # The result rows, and beside them the actor that made them (outside Ray: "local/<pid>/<device>") and
    # the measurements for the run's metrics.
    assert out.drop_columns(list(MEASUREMENT_COLUMNS)).schema == RESULT_SCHEMA
    assert out.column_names[-len(MEASUREMENT_COLUMNS):] == list(MEASUREMENT_COLUMNS)
    assert set(out.column("_worker").to_pylist()) == {stage.worker} == {f"local/{os.getpid()}/cpu"}
    assert out.column("_input_bytes").to_pylist() == [1000, 1001, None]
    assert out.column("_decode_seconds").to_pylist() == [0.25, 0.25, 0.5]
    model_seconds = out.column("_model_seconds").to_pylist()
    assert model_seconds[0] > 0 and model_seconds[1] > 0 and model_seconds[2] is None
    # The landscape and the portrait image (426x320 and 320x512 at model size) pad each other by more
    # than MAX_BATCH_PADDING: two model batches of one image, with no padding.
    sizes = [model_input_size(320, 240, 320, 640), model_input_size(200, 320, 320, 640)]
    assert sizes == [(426, 320), (320, 512)] and shape_batches(sizes, 2) == [[1], [0]]
    assert out.column("_batch_images").to_pylist() == [[1], [1], None]
    assert out.column("_batch_padding").to_pylist() == [[0.0], [0.0], None]
    rows = out.drop_columns(list(MEASUREMENT_COLUMNS)).to_pylist()
    assert [row["path"] for row in rows] == ["img0.jpg", "img1.jpg", "bad2.jpg"]
    assert [(row["width"], row["height"]) for row in rows] == [(640, 480), (400, 640), (None, None)]
    # The model called directly, boxes scaled by 2 (the original is twice the model input).
    for row, want in zip(rows, reference_detections(images)):
        assert row["num_detections"] == len(want["labels"]) == len(row["boxes"]) == len(row["scores"])
        assert row["num_detections"] == 100  # threshold 0 keeps max_detections (100) random-init detections
        np.testing.assert_allclose(np.array(row["boxes"]), want["boxes"] * 2, rtol=1e-5)
        np.testing.assert_allclose(row["scores"], want["scores"], rtol=1e-6)
        assert row["labels"] == want["labels"].tolist()
        assert row["label_names"] == [stage.detector.categories[label] for label in row["labels"]]
        assert row["error"] is None
        # A bound: torchvision clips boxes to the image (here 640x480 and 400x640, twice the model input).
        assert all(0 <= x <= 640 for box in row["boxes"] for x in box)
    bad = rows[2]
    assert (bad["boxes"], bad["scores"], bad["labels"], bad["num_detections"]) == ([], [], [], 0)
    assert (bad["error_kind"], bad["error"]) == ("corrupt_image", "corrupt_image happened")


@pytest.mark.slow
def test_images_at_model_size_are_not_resized_again():
    """426x320 is the 320-px model's own size for a 4:3 image; 100x100 is not and is resized by the model."""
    model = PixelModel(build_model(SPEC)[0])
    resized = []
    original = type(model.model.transform).__mro__[1].resize

    def recording(self, image, target=None):
        resized.append(tuple(image.shape[-2:]))
        return original(self, image, target)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(type(model.model.transform).__mro__[1], "resize", recording)
        with torch.inference_mode():
            model([torch.zeros(3, 320, 426, dtype=torch.uint8), torch.zeros(3, 100, 100, dtype=torch.uint8)])
    assert resized == [(100, 100)]


@pytest.mark.slow
def test_every_image_of_a_mixed_call_gets_its_own_detections(stage):
    """The detector alone, pixels in and detections out (boxes in the pixels it was given): portraits and
    landscapes go to the model in separate batches; each image still gets its own detections."""
    rng = np.random.default_rng(1)
    shapes = [(240, 320), (320, 240), (240, 320), (320, 240), (240, 320)]
    images = [rng.integers(0, 255, (*shape, 3), dtype=np.uint8) for shape in shapes]
    found, ran = stage.detector.detect_batches(images)
    assert sorted(batch.indices for batch in ran) == [[0, 2], [1, 3], [4]]  # batch_size 2, one shape each
    for detections, want in zip(found, reference_detections(images)):
        assert sorted(detections) == ["boxes", "labels", "scores"]
        np.testing.assert_allclose(detections["boxes"], want["boxes"], rtol=1e-4, atol=1e-3)
        assert detections["labels"].tolist() == want["labels"].tolist()


def test_batch_of_only_errors_skips_the_model(stage):
    out = stage(decoded_batch([], errors=["empty_file", "too_large"]))
    assert out.column("error_kind").to_pylist() == ["empty_file", "too_large"]
    assert out.column("num_detections").to_pylist() == [0, 0]


# ---------------------------------------------------------------------------------------------------
# Real images through the decode stage and the detector, against torchvision called directly
# ---------------------------------------------------------------------------------------------------

# Bundled photos at sizes whose model input (320 px shorter side) is 426x320 or 320x426: the three
# landscapes share one padded size, so the detector batches them without padding any of them more
# than the model alone would, and a reference run one image at a time sees the same tensors.
PHOTOS = {"chelsea.jpg": (640, 480), "coffee.jpg": (400, 300), "rocket.jpg": (800, 600), "astronaut.jpg": (300, 400)}
LIGHT = "fasterrcnn_mobilenet_v3_large_320_fpn"


def light_spec(*overrides: str, data_path: str = "/in") -> ModelSpec:
    """The ModelSpec the job builds (app.pipeline.model_spec) from a composed config."""
    return model_spec(compose_config([f"model={LIGHT}", f"data.path={data_path}", *overrides]))


def decoded_files(folder, min_size=None, max_size=None) -> pa.Table:
    """The images under folder as the job's CPU stage decodes them (listing, then app.decode)."""
    inputs = list_inputs(str(folder), ["jpg", "png"]).found
    options = DecodeOptions(max_file_bytes=10**7, max_image_pixels=10**7, min_size=min_size, max_size=max_size)
    return decode_images(inputs, filesystem=pafs.LocalFileSystem(), uri_prefix="", options=options)


def float_image(pixels: np.ndarray) -> torch.Tensor:
    """HWC uint8 pixels as a user gives them to torchvision: CHW floats in [0, 1], divided by 255."""
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).float().div(255)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """The bundled sample photos resized to PHOTOS' sizes, as JPEGs in a folder."""
    folder = tmp_path_factory.mktemp("photos")
    for name, size in PHOTOS.items():
        Image.open(SAMPLES_DIR / name).convert("RGB").resize(size, Image.Resampling.BILINEAR).save(folder / name, quality=92)
    return folder


@pytest.fixture(scope="module")
def checkpoint():
    """The tests' model weights (tests.conftest.light_checkpoint): detections that depend on the image."""
    return light_checkpoint()


def decoded_pixels(row: dict) -> np.ndarray:
    return np.frombuffer(row["pixels"], np.uint8).reshape(row["pixel_height"], row["pixel_width"], 3)


def torchvision_detections(model: torch.nn.Module, pixels: np.ndarray) -> dict[str, np.ndarray]:
    """The torchvision model called directly, as a user calls it, on one image."""
    with torch.inference_mode():
        output = model([float_image(pixels)])[0]
    return {key: value.numpy() for key, value in output.items()}


@pytest.mark.slow
def test_detector_rows_are_torchvisions_detections_in_original_pixels(photos, checkpoint):
    """Files decoded by the CPU stage, then DetectorStage.__call__ (the Ray Data call) on the decoded batch,
    against torchvision's model, built by app.model.build_model from the same spec, called directly on
    float tensors of the same decoded pixels, one image at a time. Its boxes are mapped to original
    pixels here, by each file's known size over its model size. With score threshold 0 and
    max_detections 5 every image has exactly 5 detections (all scores are above 0, and NMS leaves far
    more than 5 boxes)."""
    spec = light_spec(f"model.weights={checkpoint}", "model.score_threshold=0", "model.max_detections=5",
                      data_path=str(photos))
    batch = decoded_files(photos, spec.min_size, spec.max_size)
    rows = DetectorStage(spec, num_threads=2, batch_size=4)(batch).drop_columns(["_worker"]).to_pylist()
    decoded = batch.to_pylist()
    assert [row["path"] for row in rows] == [str(photos / name) for name in sorted(PHOTOS)]
    assert [(row["pixel_width"], row["pixel_height"]) for row in decoded] == [(320, 426), (426, 320), (426, 320), (426, 320)]
    reference, _ = build_model(spec)
    categories = get_model_weights(spec.name).DEFAULT.meta["categories"]  # torchvision's COCO names
    for row, image in zip(rows, decoded):
        width, height = PHOTOS[row["path"].rsplit("/", 1)[1]]
        want = torchvision_detections(reference, decoded_pixels(image))
        assert (row["width"], row["height"], row["error_kind"]) == (width, height, None)
        assert row["num_detections"] == len(want["labels"]) == len(row["boxes"]) == len(row["scores"]) == 5
        # Float tolerances: the detector batches the three landscapes, and multiplies by 1/255 where
        # the reference divides; both change the last bits of the convolutions' sums.
        to_original = np.array([width / image["pixel_width"], height / image["pixel_height"]] * 2)
        np.testing.assert_allclose(np.array(row["boxes"]), want["boxes"] * to_original, rtol=1e-5, atol=1e-3)
        np.testing.assert_allclose(row["scores"], want["scores"], rtol=0, atol=1e-6)
        assert row["labels"] == want["labels"].tolist()
        assert row["label_names"] == [categories[label] for label in want["labels"]]


@pytest.mark.slow
def test_the_score_threshold_drops_the_detections_at_or_below_it(photos, checkpoint):
    """The same two photos through a detector without a threshold and one whose threshold is exactly the
    score of one of the first image's detections (the one just below the widest gap among its 3rd to
    31st): that detection is dropped (model.score_threshold: "at or below it are dropped"; torchvision
    keeps scores above), and the second keeps exactly the first's detections scoring above it, in the same
    order, on both images."""
    batch = decoded_files(photos, 320, 640).slice(0, 2)
    weights = f"model.weights={checkpoint}"
    unthresholded = DetectorStage(light_spec(weights, "model.score_threshold=0"), num_threads=2)(batch).to_pylist()
    assert [row["num_detections"] for row in unthresholded] == [100, 100]  # max_detections' default
    scores = np.array(unthresholded[0]["scores"], np.float32)
    assert np.all(np.diff(scores) <= 0)  # highest first
    gap = int(np.argmax(scores[2:30] - scores[3:31])) + 2
    threshold = float(scores[gap + 1])  # a float32 score, exactly
    assert scores[gap] > threshold
    thresholded = DetectorStage(light_spec(weights, f"model.score_threshold={threshold!r}"), num_threads=2)(batch).to_pylist()
    assert thresholded[0]["num_detections"] == gap + 1 and threshold not in thresholded[0]["scores"]
    for row, everything in zip(thresholded, unthresholded):
        keep = [i for i, score in enumerate(everything["scores"]) if score > threshold]
        assert row["num_detections"] == len(keep)
        assert row["scores"] == [everything["scores"][i] for i in keep]
        assert row["boxes"] == [everything["boxes"][i] for i in keep]
        assert row["labels"] == [everything["labels"][i] for i in keep]
        assert row["label_names"] == [everything["label_names"][i] for i in keep]


@pytest.mark.slow
def test_resize_on_cpu_false_decodes_at_original_size_and_finds_the_same_boxes(tmp_path, checkpoint):
    """inference.resize_on_cpu=false: the decode stage keeps the original size (DecodeOptions without a
    model size) and the model's transform resizes; the rows are the same as the resized path's, boxes in
    original pixels. The photo is 213x160, which both paths double exactly to 426x320, with pixel values
    that are multiples of 16, so that Pillow's bilinear upscaling (uint8) and torch's (float) give the
    same values: the two paths then differ only in float rounding, not in pixels."""
    photo = Image.open(SAMPLES_DIR / "chelsea.jpg").convert("RGB").resize((213, 160), Image.Resampling.BILINEAR)
    Image.fromarray(np.asarray(photo) // 16 * 16).save(tmp_path / "small.png")
    spec = light_spec(f"model.weights={checkpoint}", "model.score_threshold=0", "model.max_detections=5")
    resized, original = decoded_files(tmp_path, 320, 640), decoded_files(tmp_path, None, None)
    assert [(r["width"], r["height"], r["pixel_width"], r["pixel_height"]) for r in resized.to_pylist()] == [(213, 160, 426, 320)]
    assert [(r["width"], r["height"], r["pixel_width"], r["pixel_height"]) for r in original.to_pylist()] == [(213, 160, 213, 160)]
    stage = DetectorStage(spec, num_threads=2)
    (on_cpu,), (in_model,) = stage(resized).to_pylist(), stage(original).to_pylist()
    assert on_cpu["num_detections"] == in_model["num_detections"] == 5
    np.testing.assert_allclose(np.array(in_model["boxes"]), np.array(on_cpu["boxes"]), rtol=0, atol=1e-2)
    np.testing.assert_allclose(in_model["scores"], on_cpu["scores"], rtol=0, atol=1e-6)
    assert in_model["labels"] == on_cpu["labels"] and in_model["label_names"] == on_cpu["label_names"]
    # Original pixels, 213x160: the same boxes at model size reach past it (x up to about 300).
    boxes = np.array(in_model["boxes"])
    assert boxes[:, [0, 2]].max() <= 213 and boxes[:, [1, 3]].max() <= 160


def test_the_detector_runs_torch_on_the_threads_it_is_given():
    """num_threads is the CPUs Ray reserved for the actor: torch uses exactly that many (at least 1)."""
    before = torch.get_num_threads()
    try:
        Detector(SPEC, num_threads=3)
        assert torch.get_num_threads() == 3
        Detector(SPEC, num_threads=0)  # never fewer than one thread
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_cpu_without_ray_gpu():
    assert choose_device() == torch.device("cpu")
    assert choose_device(cpu_fallback=True) == torch.device("cpu")


def test_nvidia_driver_version_is_read_from_the_kernel_module(monkeypatch, tmp_path):
    version_file = tmp_path / "version"
    version_file.write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug 19 01:15:15 UTC 2023\n"
                            "GCC version:  gcc version 12.2.0 (Debian 12.2.0-14)\n")
    monkeypatch.setattr("app.device.NVIDIA_DRIVER_VERSION_FILE", str(version_file))
    assert nvidia_driver_version() == "535.104.05"
    monkeypatch.setattr("app.device.NVIDIA_DRIVER_VERSION_FILE", str(tmp_path / "absent"))
    assert nvidia_driver_version() is None


def test_label_names_are_coco_for_random_init():
    _, categories = build_model(SPEC)
    assert len(categories) == 91
    assert categories[1] == "person" and categories[17] == "cat" and categories[18] == "dog"


def test_random_init_is_the_same_in_every_actor_and_leaves_the_global_seed_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first, second = build_model(SPEC)[0].state_dict(), build_model(SPEC)[0].state_dict()
    assert all(torch.equal(first[key], second[key]) for key in first)
    assert torch.equal(torch.rand(3), expected_next)


@pytest.mark.slow
def test_checkpoint_with_its_own_classes(tmp_path):
    model, _ = build_model(SPEC.__class__(**{**SPEC.__dict__, "num_classes": 3}))
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "class_names": ["__background__", "widget", "gadget"]}, path)
    spec = resolve_weights(ModelSpec(**{**SPEC.__dict__, "weights": str(path)}))
    loaded, categories = build_model(spec)
    assert categories == ["__background__", "widget", "gadget"]
    assert loaded.roi_heads.box_predictor.cls_score.out_features == 3
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_missing_checkpoint_fails_before_work(tmp_path):
    with pytest.raises(WeightsError, match=f"^model.weights checkpoint {tmp_path}/nope.pt does not exist$"):
        resolve_weights(ModelSpec(**{**SPEC.__dict__, "weights": str(tmp_path / "nope.pt")}))


def test_default_weights_offline_fail_with_a_paragraph(monkeypatch, tmp_path):
    """The download is replaced by a failing stand-in, so the test behaves the same with or without
    network (these machines have none; a developer's laptop would otherwise fetch 170 MB)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    with pytest.raises(WeightsError) as caught:
        resolve_weights(ModelSpec(**{**SPEC.__dict__, "weights": "DEFAULT"}))
    message = str(caught.value)
    assert message == (
        "model.weights=DEFAULT needs torchvision's pretrained weights for fasterrcnn_mobilenet_v3_large_320_fpn, which "
        f"are not in TORCH_HOME ({tmp_path / 'hub'}) and could not be downloaded from "
        "https://download.pytorch.org/models/fasterrcnn_mobilenet_v3_large_320_fpn-907ea3f9.pth (OSError: offline). Fix "
        "it in one of three ways: point model.weights at a checkpoint file (local path or URI); pre-fill TORCH_HOME "
        "with fasterrcnn_mobilenet_v3_large_320_fpn-907ea3f9.pth under hub/checkpoints/ (the Docker image does this "
        "at build time); or pass model.weights=none for random initialisation, whose detections are meaningless."
    )
    fallback = resolve_weights(ModelSpec(**{**SPEC.__dict__, "weights": "DEFAULT"}), allow_random_fallback=True)
    assert fallback.weights == "none" and fallback.fallback_reason == message


# The GPU path's logic, run on the CPU. No GPU exists on the machines these tests run on, so CUDA's
# out-of-memory error is raised by stand-in models, and the staging overlap is shown with a stand-in
# model; the pinned copy on a copy stream runs only in the CUDA-only tests below, where a GPU exists
# (scripts/gpu-check.sh).


def test_to_device_on_the_cpu_views_the_pixels_as_chw():
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, (5, 7, 3), dtype=np.uint8), rng.integers(0, 256, (2, 3, 3), dtype=np.uint8)]
    images[1].setflags(write=False)  # decoded pixels arrive as read-only views of Arrow buffers
    staged = to_device(images, torch.device("cpu"))
    tensors = staged.ready()
    assert [tuple(t.shape) for t in tensors] == [(3, 5, 7), (3, 2, 3)]
    for tensor, image in zip(tensors, images):
        assert tensor.dtype == torch.uint8
        assert np.array_equal(tensor.permute(1, 2, 0).numpy(), image)
        assert tensor.data_ptr() == image.ctypes.data  # a view: nothing was copied


def test_tiles_views_of_a_scene_pack_into_the_staging_buffer_and_unpack_as_chw():
    """The CUDA staging's packing, on the CPU (the pinned buffer and the copy need CUDA): tiles, which are
    strided views of their scene, each land whole in one flat buffer, and come back out as CHW views of it."""
    scene = np.random.default_rng(5).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    tiles = [scene[0:16, 0:16], scene[0:16, 34:50], scene[24:40, 10:26], scene]
    buffer = packed(tiles, torch.empty(sum(tile.size for tile in tiles), dtype=torch.uint8))
    assert buffer[: 16 * 16 * 3].numpy().tolist() == scene[0:16, 0:16].reshape(-1).tolist()
    tensors = unpacked(buffer, [tile.shape for tile in tiles])
    assert [tuple(tensor.shape) for tensor in tensors] == [(3, 16, 16)] * 3 + [(3, 40, 50)]
    for tensor, tile in zip(tensors, tiles):
        assert np.array_equal(tensor.permute(1, 2, 0).numpy(), tile)
        assert buffer.data_ptr() <= tensor.data_ptr() < buffer.data_ptr() + buffer.numel()  # views of the buffer


@pytest.mark.cuda
def test_to_device_on_cuda_matches_the_cpu():
    """Pixels packed into a pinned buffer, copied on a side stream, then used on the default stream; a
    tile (a strided view of its scene) too."""
    images = [np.random.default_rng(4).integers(0, 256, (48, 64, 3), dtype=np.uint8) for _ in range(3)]
    images.append(images[0][8:40, 16:48])
    on_gpu = to_device(images, torch.device("cuda"), torch.cuda.Stream()).ready()
    on_cpu = to_device(images, torch.device("cpu")).ready()
    assert all(g.device.type == "cuda" and torch.equal(g.cpu(), c) for g, c in zip(on_gpu, on_cpu))


@pytest.mark.cuda
def test_pixels_become_the_same_floats_on_cuda_and_cpu():
    """CUDA divides by a scalar as a multiplication by its reciprocal, which differs from a true
    division in the last bit for 126 of the 256 byte values; PixelModel multiplies on every device."""
    pixels = torch.arange(256, dtype=torch.uint8).reshape(1, 16, 16)
    model = PixelModel(build_model(SPEC)[0])
    model.model = recorder = InputRecorder()
    model([pixels])
    model.cuda()([pixels.cuda()])
    on_cpu, on_cuda = recorder.seen
    assert on_cuda.device.type == "cuda" and torch.equal(on_cpu, on_cuda.cpu())
    assert torch.equal(on_cpu, pixels.float().mul(1 / 255))


@pytest.mark.cuda
def test_a_gpu_actor_finds_what_the_model_finds_on_the_cpu():
    """The detector in a Ray actor given the GPU, as the pipeline places it: the model on CUDA, the pinned
    copy on the copy stream and the staging thread all used. Its rows against the model called on the CPU.
    Convolutions on CUDA round differently (TF32 on Ampere and newer), so scores and boxes agree to a
    tolerance, not bit for bit, and with random weights many detections score alike, so near-ties swap
    in and out of the 100 kept: on an H100, 241 of the 300 CPU detections had a GPU twin within 0.5 px and
    1e-3 in score. Wrong pixels (a channel order, a stride, a stale buffer) match next to none."""
    import ray

    rng = np.random.default_rng(5)
    images = [rng.integers(0, 255, (240, 320, 3), dtype=np.uint8), rng.integers(0, 255, (320, 240, 3), dtype=np.uint8),
              rng.integers(0, 255, (240, 320, 3), dtype=np.uint8)]
    ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False)
    try:
        actor = ray.remote(num_gpus=1)(DetectorActor).remote(SPEC, num_threads=2, batch_size=2)
        rows = ray.get(actor.run.remote(decoded_batch(images))).to_pylist()
    finally:
        ray.shutdown()
    assert {row["_worker"].rsplit("/", 1)[1] for row in rows} == {"cuda:" + torch.cuda.get_device_name()}
    matched = total = 0
    for row, want in zip(rows, reference_detections(images)):
        assert row["num_detections"] > 0 and len(want["labels"]) > 0
        total += len(want["labels"])
        # The originals are twice the model input.
        matched += twins(want, {"boxes": np.array(row["boxes"]) / 2, "scores": row["scores"], "labels": row["labels"]})
    assert matched >= 0.7 * total, f"{matched} of {total} CPU detections found on the GPU"


def twins(want: dict, got: dict, pixels: float = 0.5, score: float = 1e-3) -> int:
    """How many of want's detections (boxes, scores, labels) have a twin in got: the same label, every box
    coordinate within `pixels` and the score within `score`."""
    boxes, scores, labels = (np.asarray(got[key]) for key in ("boxes", "scores", "labels"))
    found = 0
    for box, box_score, label in zip(*(np.asarray(want[key]) for key in ("boxes", "scores", "labels"))):
        close = (np.abs(boxes - box).max(axis=1) < pixels) & (np.abs(scores - box_score) < score) & (labels == label)
        found += bool(np.any(close))
    return found


def stage_on(device_type: str, monkeypatch, *args, **kwargs) -> DetectorStage:
    """A DetectorStage whose detector runs on the CPU or, as if Ray had given it the GPU, on CUDA."""
    monkeypatch.setattr(device, "assigned_gpu_ids", lambda: [0] if device_type == "cuda" else [])
    stage = DetectorStage(*args, **kwargs)
    assert stage.detector.device.type == device_type
    return stage


@pytest.mark.cuda
def test_a_tiled_scene_on_the_gpu_finds_what_it_finds_on_the_cpu(tmp_path, monkeypatch, checkpoint):
    """Tiles are strided views of their scene's full-size pixels; on the GPU each is packed into the pinned
    staging buffer (on the CPU they are used in place). A 1100x750 scene cut into 320-px tiles plus the
    whole-image pass, through the tiled detector on CUDA and on the CPU, tests' checkpoint: the same
    number of model inputs and the merged detections alike, to the tolerance that CUDA's rounding allows
    (a tile misplaced or a stride wrong would match next to none)."""
    Image.open(SAMPLES_DIR / "chelsea.jpg").convert("RGB").resize((1100, 750)).save(tmp_path / "scene.png")
    tiling = TilingOptions(320, 0.2, True, MergeMethod.nmm, MatchMetric.ios, 0.5, True)
    inputs = list_inputs(str(tmp_path), ["png"]).found
    batch = decode_images(inputs, filesystem=pafs.LocalFileSystem(), uri_prefix="",
                          options=DecodeOptions(10**8, 10**8, 320, 640, tiling=tiling))
    spec = light_spec(f"model.weights={checkpoint}", "model.score_threshold=0", "model.max_detections=20")
    rows = {}
    for device_type in ("cpu", "cuda"):
        (rows[device_type],) = stage_on(device_type, monkeypatch, spec, num_threads=2, batch_size=4, tiling=tiling)(batch).to_pylist()
    assert rows["cuda"]["num_tiles"] == rows["cpu"]["num_tiles"] == len(tile_grid(1100, 750, 320, 0.2)) + 1
    want, got = rows["cpu"], rows["cuda"]
    assert want["num_detections"] > 20  # the tiles' detections, merged
    matched = twins(want, got, pixels=1.0)
    assert matched >= 0.8 * want["num_detections"], f"{matched} of {want['num_detections']} CPU detections found on the GPU"


@pytest.mark.cuda
def test_a_batch_the_gpu_has_no_memory_for_is_split_and_every_image_keeps_its_detections(monkeypatch, checkpoint):
    """A real CUDA out-of-memory error, not a stand-in: this process's share of the GPU is capped (torch's
    per-process memory fraction) at what the model and about three images' model calls need, then eight
    images of one shape go into one model batch. The runner splits it, every image gets its detections,
    and they are the ones each image gets in a model batch of its own, to CUDA's rounding."""
    spec = light_spec(f"model.weights={checkpoint}", "model.score_threshold=0", "model.max_detections=20",
                      "model.min_size=800", "model.max_size=1333")
    detector = stage_on("cuda", monkeypatch, spec, num_threads=2, batch_size=8).detector
    photo = np.asarray(Image.open(SAMPLES_DIR / "chelsea.jpg").convert("RGB").resize((1333, 800)))
    images = [np.ascontiguousarray(np.roll(photo, 40 * k, axis=1)) for k in range(8)]  # one shape, different pixels
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    resting = torch.cuda.memory_allocated()
    alone = [detector.detect([image])[0] for image in images]
    one_image = torch.cuda.max_memory_allocated() - resting
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_reserved() + 3 * one_image) / total)
    try:
        together, ran = detector.detect_batches(images)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    assert detector.runner.splits >= 1, f"8 images fitted in {3 * one_image / 2**20:.0f} MiB above the model"
    assert sorted(i for batch in ran for i in batch.indices) == list(range(8)) and len(ran) == 1  # one model batch, split inside
    for k, (want, got) in enumerate(zip(alone, together)):
        assert len(got["labels"]) == len(want["labels"]) == 20, k
        assert twins(want, got) >= 18, k


class DetectorActor:
    """The detector stage as the body of a plain Ray actor (the pipeline wraps it in Ray Data's own)."""

    def __init__(self, *args, **kwargs):
        self.stage = DetectorStage(*args, **kwargs)

    def run(self, batch: pa.Table) -> pa.Table:
        return self.stage(batch)


class InputRecorder(torch.nn.Module):
    """Stands in for the torchvision model inside PixelModel: keeps the first image it is given."""

    def __init__(self):
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, images):
        self.seen.append(images[0])
        return []


class FakeOutOfMemoryModel:
    """Stand-in for a model on a GPU: raises CUDA's out-of-memory error for more than `fits` inputs
    (`fail_single` times for a single input), else returns each input doubled."""

    def __init__(self, fits: int, fail_single: int = 0):
        self.fits, self.fail_single = fits, fail_single
        self.calls: list[int] = []

    def __call__(self, inputs):
        self.calls.append(len(inputs))
        if len(inputs) > self.fits or (len(inputs) == 1 and self.fail_single > 0):
            self.fail_single -= len(inputs) == 1
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {len(inputs)} GiB")
        return [x * 2 for x in inputs]


class Messages(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_out_of_memory_splits_the_batch_and_caps_later_batches():
    model, released, log = FakeOutOfMemoryModel(fits=2), [], Messages()
    runner = SplittingRunner(model, release_memory=lambda: released.append(1))
    logging.getLogger("app").addHandler(log)
    try:
        assert runner(list(range(7))) == [0, 2, 4, 6, 8, 10, 12]  # every input once, in order
    finally:
        logging.getLogger("app").removeHandler(log)
    # 7 fails → 3 fails → 1 ok, 2 ok; 4 fails → 2 ok, 2 ok
    assert model.calls == [7, 3, 1, 2, 4, 2, 2]
    assert (runner.splits, runner.limit, len(released)) == (3, 1, 3)
    assert log.messages[0] == (
        "out of device memory on a batch of 7 images; splitting it in halves: CUDA out of memory. Tried to allocate 7 GiB"
    )
    # Later batches go in chunks of the cap at once, without new errors.
    model.calls.clear()
    assert runner([1, 2, 3]) == [2, 4, 6]
    assert model.calls == [1, 1, 1]


def test_a_single_image_out_of_memory_is_retried_once_then_raised():
    runner = SplittingRunner(FakeOutOfMemoryModel(fits=4, fail_single=1))
    assert runner([5]) == [10]  # a passing shortage
    model = FakeOutOfMemoryModel(fits=4, fail_single=2)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        SplittingRunner(model)([5])
    assert model.calls == [1, 1]


def test_other_errors_are_not_retried():
    calls = []

    def broken(inputs):
        calls.append(len(inputs))
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="^shape mismatch$"):
        SplittingRunner(broken)([1, 2, 3, 4])
    assert calls == [4]


@pytest.mark.parametrize("error,out_of_memory", [
    (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
    # cudaHostAlloc or a cudaMalloc outside torch's caching allocator (a pinned staging buffer)
    (RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported"), True),
    (RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"), True),
    (RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"), True),
    (RuntimeError("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR_DEVICE_ALLOCATION_FAILED"), True),
    (RuntimeError("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR_HOST_ALLOCATION_FAILED"), True),
    (RuntimeError("CUDA error: an illegal memory access was encountered"), False),
    (RuntimeError("CUDA error: no kernel image is available for execution on the device"), False),
    (RuntimeError("shape mismatch"), False),
])
def test_out_of_memory_is_recognised_in_torchs_cublass_and_cudnns_words(error, out_of_memory):
    assert is_out_of_memory(error) is out_of_memory


def test_a_cublas_allocation_failure_splits_the_batch_like_an_out_of_memory_error():
    calls = []

    def model(inputs):
        calls.append(len(inputs))
        if len(inputs) > 1:
            raise RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")
        return inputs

    assert SplittingRunner(model)([1, 2]) == [1, 2]
    assert calls == [2, 1, 1]


def test_the_cap_doubles_after_16_model_calls_fit_until_it_is_lifted():
    model = FakeOutOfMemoryModel(fits=2)
    runner = SplittingRunner(model)
    assert runner(list(range(8))) == [0, 2, 4, 6, 8, 10, 12, 14]
    assert (model.calls, runner.limit, runner.fitted) == ([8, 4, 2, 2, 4, 2, 2], 2, 2)  # 2 fitted since the last error
    model.fits = 8  # the memory that was short is free again
    model.calls.clear()
    while runner.limit == 2:
        assert runner(list(range(8))) == [0, 2, 4, 6, 8, 10, 12, 14]
    # 14 more calls of 2 (16 in a row), then the cap is 4 for the rest of that run's images.
    assert (model.calls, runner.limit) == ([2] * 14 + [4], 4)
    model.calls.clear()
    while runner.limit == 4:
        runner(list(range(8)))
    # 15 more calls of 4, then 8, the most the runner was given, lifts the cap (the rest of that run: 4).
    assert (model.calls, runner.limit) == ([4] * 16, None)
    runner(list(range(8)))
    assert model.calls[-1] == 8


def test_a_raised_cap_that_runs_out_of_memory_again_waits_twice_as_long_before_the_next_raise():
    model = FakeOutOfMemoryModel(fits=2)
    runner = SplittingRunner(model)
    runner(list(range(8)))  # the cap is 2; 2 calls fitted since the last error
    model.calls.clear()
    for _ in range(4):
        runner(list(range(8)))
    # 14 calls of 2 fit (16 in a row), the cap doubles, and the next call, of 4, runs out of memory.
    assert model.calls == [2] * 14 + [4, 2, 2]
    assert (runner.limit, runner.patience, runner.fitted) == (2, 32, 2)
    model.calls.clear()
    for _ in range(8):
        runner(list(range(8)))
    assert model.calls == [2] * 30 + [4, 2, 2]  # the next raise came after 32 calls
    assert (runner.limit, runner.patience, runner.fitted) == (2, 64, 2)


class OutOfMemoryStagingDetector(Detector):
    """A Detector whose staging runs out of device memory for more than one image at a time (a stand-in
    for a pinned buffer or a device copy that does not fit), with a FakeDetectionModel that fits any batch."""

    def load_model(self, spec):
        self.staged: list[int] = []
        return FakeDetectionModel(fits=100), build_model(spec)[1]

    def stage(self, images):
        self.staged.append(len(images))
        if len(images) > 1:
            raise RuntimeError("CUDA error: out of memory")
        return super().stage(images)


def test_out_of_memory_while_staging_splits_the_batch_and_returns_every_row(caplog):
    stage = DetectorStage(SPEC, detector=OutOfMemoryStagingDetector, num_threads=1, batch_size=4)
    detector = stage.detector
    images = [np.zeros((30, 40, 3), np.uint8), np.zeros((60, 80, 3), np.uint8), np.zeros((15, 20, 3), np.uint8)]
    with caplog.at_level(logging.WARNING, logger="app.detector"):
        rows = stage(decoded_batch(images)).to_pylist()
    # Staged ahead: 3 fails; with the model call: 3 fails → 1 fits, 2 fails → 1, 1.
    assert detector.staged == [3, 3, 1, 2, 1, 1]
    assert detector.model.calls == [1, 1, 1]
    # Each box covers its original image, twice the decoded size.
    assert [row["boxes"] for row in rows] == [[[0.0, 0.0, 80.0, 60.0]], [[0.0, 0.0, 160.0, 120.0]], [[0.0, 0.0, 40.0, 30.0]]]
    assert [record.getMessage() for record in caplog.records] == [
        "out of device memory while copying a batch of 3 images to the device; it is copied again with its model "
        "call: CUDA error: out of memory",
        "out of device memory on a batch of 3 images; splitting it in halves: CUDA error: out of memory",
        "out of device memory on a batch of 2 images; splitting it in halves: CUDA error: out of memory",
    ]


class HostTensors(TorchDispatchMode):
    """Counts the tensors made from host data (torch.tensor, torch.as_tensor of Python numbers): on a
    GPU each is a blocking copy from the host."""

    def __init__(self):
        super().__init__()
        self.made = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.made += func is torch.ops.aten.lift_fresh.default
        return func(*args, **(kwargs or {}))


def test_the_transform_normalises_and_scales_boxes_as_torchvision_does_without_host_tensors():
    """PresizedTransform against torchvision's GeneralizedRCNNTransform on the same images and boxes:
    equal tensors, bit for bit, and no tensor made from host data where torchvision makes 2 per image
    to normalise and 4 per image to scale its boxes back."""
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    theirs, ours = GeneralizedRCNNTransform(800, 1333, mean, std).eval(), PresizedTransform(800, 1333, mean, std).eval()
    rng = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 800, 1066, generator=rng), torch.rand(3, 1066, 800, generator=rng)]
    boxes = [torch.rand(7, 4, generator=rng) * 800, torch.rand(3, 4, generator=rng) * 800]
    sizes, originals = [(800, 1066), (1066, 800)], [(375, 500), (1066, 800)]  # the second at its own size
    counted = {}
    for name, transform in (("torchvision", theirs), ("ours", ours)):
        with HostTensors() as host:
            normalised = [transform.normalize(image) for image in images]
            scaled = transform.postprocess([{"boxes": b.clone()} for b in boxes], sizes, originals)
        counted[name] = (host.made, normalised, [output["boxes"] for output in scaled])
    assert (counted["torchvision"][0], counted["ours"][0]) == (12, 0)
    assert all(torch.equal(a, b) for a, b in zip(counted["torchvision"][1], counted["ours"][1]))
    assert all(torch.equal(a, b) for a, b in zip(counted["torchvision"][2], counted["ours"][2]))
    assert not torch.equal(counted["ours"][2][0], boxes[0])  # the first image's boxes were scaled


class FakeDetectionModel(torch.nn.Module):
    """Stand-in detection model: one box per image covering it, score 0.75, label 17 ("cat"), in
    `dtype`. It runs out of memory on more than `fits` images."""

    def __init__(self, fits: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.fits, self.dtype = fits, dtype
        self.calls: list[int] = []

    def forward(self, images):
        self.calls.append(len(images))
        if len(images) > self.fits:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return [
            {
                "boxes": torch.tensor([[0.0, 0.0, image.shape[2], image.shape[1]]], dtype=self.dtype),
                "scores": torch.tensor([0.75], dtype=self.dtype),
                "labels": torch.tensor([17]),
            }
            for image in images
        ]


class FakeModelDetector(Detector):
    """A Detector whose model is a FakeDetectionModel (load_model is the seam the benchmark uses too)."""

    fake: FakeDetectionModel

    def load_model(self, spec):
        return self.fake, build_model(spec)[1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_detector_splits_an_out_of_memory_batch_and_returns_every_row(dtype):
    FakeModelDetector.fake = fake = FakeDetectionModel(fits=1, dtype=dtype)
    stage = DetectorStage(SPEC, detector=FakeModelDetector, num_threads=1)
    # One shape family (4:3, 426x320 at model size), so one model batch, smallest image first.
    images = [np.zeros((30, 40, 3), np.uint8), np.zeros((60, 80, 3), np.uint8), np.zeros((15, 20, 3), np.uint8)]
    rows = stage(decoded_batch(images, errors=["empty_file"])).to_pylist()
    assert fake.calls == [3, 1, 2, 1, 1]  # 3 fails → 1, then 2 fails → 1, 1
    assert [row["path"] for row in rows] == ["img0.jpg", "img1.jpg", "img2.jpg", "bad3.jpg"]
    # Boxes cover each original image (twice the decoded size), in float32 even from bf16 outputs.
    assert [row["boxes"] for row in rows] == [[[0.0, 0.0, 80.0, 60.0]], [[0.0, 0.0, 160.0, 120.0]], [[0.0, 0.0, 40.0, 30.0]], []]
    assert [row["scores"] for row in rows] == [[0.75], [0.75], [0.75], []]
    assert [row["label_names"] for row in rows] == [["cat"], ["cat"], ["cat"], []]
    assert rows[3]["error_kind"] == "empty_file"


class HandshakeModel(torch.nn.Module):
    """Stand-in model that cannot finish batch n until the staging of batch n + 1 has begun."""

    def __init__(self, staging_started: list[threading.Event]):
        super().__init__()
        self.staging_started = staging_started
        self.batches = 0

    def forward(self, images):
        number, self.batches = self.batches, self.batches + 1
        if number + 1 < len(self.staging_started):
            assert self.staging_started[number + 1].wait(timeout=10), f"batch {number + 1} was not staged during batch {number}"
        return [{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)} for _ in images]


class HandshakeDetector(Detector):
    """A Detector with a HandshakeModel: without the overlap, the first batch waits out its timeout and fails."""

    def load_model(self, spec):
        self.staging_started = [threading.Event() for _ in range(3)]
        self.staged = 0
        return HandshakeModel(self.staging_started), build_model(spec)[1]

    def stage(self, images):
        self.staging_started[self.staged].set()
        self.staged += 1
        return super().stage(images)


def test_the_next_batch_is_staged_while_the_model_runs():
    stage = DetectorStage(SPEC, detector=HandshakeDetector, num_threads=1, batch_size=2)
    detector = stage.detector
    images = [np.zeros((30, 40, 3), np.uint8)] * 6  # three model batches of two
    rows = stage(decoded_batch(images)).to_pylist()
    assert (detector.model.batches, detector.staged) == (3, 3)
    assert [row["num_detections"] for row in rows] == [0] * 6


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="^precision 'fp8' is not one of fp32, fp16, bf16$"):
        Detector(SPEC, num_threads=1, precision="fp8")


@pytest.mark.slow
def test_the_tests_model_detects_differently_in_each_sample_image():
    """The premise of every row comparison in the tests: FAST_MODEL's detections depend on the image. For
    every pair of bundled photos, the best detection's score differs by more than 1e-4 and its box, as a
    fraction of the image's sides, by more than 0.05 in some coordinate."""
    cfg = compose_config([*FAST_MODEL, "output.path=unused"])
    paths = sorted(SAMPLES_DIR.glob("*.jpg"))
    found = model_detections(cfg, paths)
    best = {}
    for path in paths:
        width, height = Image.open(path).size
        detections = found[str(path)]
        assert len(detections["boxes"]) == 3
        best[path.name] = (detections["scores"][0], np.array(detections["boxes"][0]) / [width, height, width, height])
    assert len(best) == 4
    for (one, (score, box)), (other, (other_score, other_box)) in itertools.combinations(best.items(), 2):
        assert abs(score - other_score) > 1e-4 and np.abs(box - other_box).max() > 0.05, (one, other)


def test_a_gpus_busy_share_comes_from_nvml_and_a_machine_without_it_gives_none_with_one_warning(caplog, monkeypatch):
    """On the CPU nothing is measured. An actor on a GPU reads NVML's utilisation through torch: here, with
    no NVIDIA driver, the real call fails and the actor warns once and measures nothing more (on a GPU
    machine the same call gives a share). NVML's answer on a GPU is then stood in for (no GPU here)."""
    detector = Detector(SPEC, num_threads=1)
    detector.detect([np.zeros((64, 96, 3), np.uint8)])
    assert detector.device_busy is None and detector.device_busy_share(None) is None
    detector.device = torch.device("cuda")  # as an actor given a GPU calls it
    try:
        import pynvml

        pynvml.nvmlInit()
        nvml = True
    except Exception:
        nvml = False
    with caplog.at_level(logging.WARNING, logger="app.detector"):
        shares = [detector.device_busy_share(None) for _ in range(2)]
    if nvml:
        assert all(0 <= share <= 1 for share in shares) and caplog.messages == []
    else:
        assert shares == [None, None]
        assert len(caplog.messages) == 1
        assert caplog.messages[0].startswith("cannot read the GPU's utilisation through NVML (")
    detector.nvml_failed = False
    monkeypatch.setattr(torch.cuda, "utilization", lambda device: 52)
    assert detector.device_busy_share(None) == 0.52
