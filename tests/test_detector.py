"""The detector UDF called directly on small batches, with a random-init model (no weights here)."""

import numpy as np
import pyarrow as pa
import pytest
import torch

from app.decode import DECODED_SCHEMA
from app.detector import Detector, choose_device, scale_boxes
from app.model import ModelSpec, WeightsError, build_model, resolve_weights
from app.results import RESULT_SCHEMA

SPEC = ModelSpec(
    name="fasterrcnn_mobilenet_v3_large_320_fpn",
    weights="none",
    score_threshold=0.0,
    min_size=320,
    max_size=640,
)


def test_scale_boxes_maps_model_pixels_to_original_pixels():
    # A 500x375 image resized to 1067x800 for the model: a box at model pixels maps back exactly.
    boxes = np.array([[106.7, 80.0, 1067.0, 800.0], [0.0, 0.0, 10.67, 8.0]], dtype=np.float32)
    mapped = scale_boxes(boxes, (1067, 800), (500, 375))
    np.testing.assert_allclose(mapped, [[50.0, 37.5, 500.0, 375.0], [0.0, 0.0, 5.0, 3.75]], rtol=1e-6)
    assert mapped.dtype == np.float32


def decoded_batch(images, errors=()):
    rows = []
    for image in images:
        height, width = image.shape[:2]
        rows.append(dict(path=f"img{len(rows)}.jpg", width=width * 2, height=height * 2, pixels=image.tobytes(),
                         pixel_width=width, pixel_height=height, error_kind=None, error=None))
    for kind in errors:
        rows.append(dict(path=f"bad{len(rows)}.jpg", width=None, height=None, pixels=None, pixel_width=None,
                         pixel_height=None, error_kind=kind, error=f"{kind} happened"))
    return pa.Table.from_pylist(rows, schema=DECODED_SCHEMA)


@pytest.fixture(scope="module")
def detector():
    torch.manual_seed(0)
    return Detector(SPEC, num_threads=2)


def test_detector_on_a_batch(detector):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (240, 320, 3), dtype=np.uint8), rng.integers(0, 255, (320, 200, 3), dtype=np.uint8)]
    out = detector(decoded_batch(images, errors=["corrupt_image"]))
    assert out.schema == RESULT_SCHEMA
    rows = out.to_pylist()
    assert [row["path"] for row in rows] == ["img0.jpg", "img1.jpg", "bad2.jpg"]
    assert [(row["width"], row["height"]) for row in rows] == [(640, 480), (400, 640), (None, None)]
    # Predictions computed straight from the model, scaled by 2 (the original is twice the model input).
    expected = detector.predict(images)
    for row, want in zip(rows, expected):
        assert row["num_detections"] == len(want["labels"]) == len(row["boxes"]) == len(row["scores"])
        assert row["num_detections"] > 0  # threshold 0 keeps random-init detections
        np.testing.assert_allclose(np.array(row["boxes"]), want["boxes"] * 2, rtol=1e-5)
        assert row["labels"] == want["labels"].tolist()
        assert row["label_names"] == [detector.categories[label] for label in row["labels"]]
        assert row["error"] is None
        assert all(0 <= x <= 640 for box in row["boxes"] for x in box)
    bad = rows[2]
    assert (bad["boxes"], bad["scores"], bad["labels"], bad["num_detections"]) == ([], [], [], 0)
    assert (bad["error_kind"], bad["error"]) == ("corrupt_image", "corrupt_image happened")


def test_batch_of_only_errors_skips_the_model(detector):
    out = detector(decoded_batch([], errors=["empty_file", "too_large"]))
    assert out.column("error_kind").to_pylist() == ["empty_file", "too_large"]
    assert out.column("num_detections").to_pylist() == [0, 0]


def test_cpu_without_ray_gpu():
    assert choose_device() == torch.device("cpu")
    assert torch.get_num_threads() >= 1


def test_label_names_are_coco_for_random_init():
    _, categories = build_model(SPEC)
    assert len(categories) == 91
    assert categories[1] == "person" and categories[17] == "cat" and categories[18] == "dog"


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
    assert message.startswith("model.weights=DEFAULT needs torchvision's pretrained weights for fasterrcnn_mobilenet_v3_large_320_fpn")
    assert "(OSError: offline)" in message and "model.weights=none" in message and "\n" not in message
    fallback = resolve_weights(ModelSpec(**{**SPEC.__dict__, "weights": "DEFAULT"}), allow_random_fallback=True)
    assert fallback.weights == "none" and fallback.fallback_reason == message
