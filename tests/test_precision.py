"""Mixed precision (app.precision) through the detector, on the CPU, where autocast runs bfloat16 and
float16 too (float16 slowly), and on the GPU where CUDA works: the geometry stays float32, NMS suppresses
as it should, and half-precision detections match float32 ones to a stated bound.

The model is the tests' light model (tests.conftest.light_checkpoint) at the heavy models' input size,
800-1,333 px, with its class scores moved onto labels 60-64: every candidate box of the 150 proposals is
one of five labels above 50, so torchvision's batched NMS takes all 750 in one call (its CPU path does up to
1,000 boxes at once, its CUDA path up to 25,000) and separates the labels by offsetting the boxes by
label x (largest coordinate + 1), about 80,000 here: past float16's largest number, and rounded to
multiples of 512 in bfloat16.
"""

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from app import device, storage
from app.config import SAMPLES_DIR, compose_config
from app.detector import Detector
from app.model import ModelSpec
from app.output.dataset import read_manifest, write_manifest
from app.summary import Summary
from tests.support.models import LIGHT, light_checkpoint

pytestmark = pytest.mark.slow  # the model in bf16 and fp16 on the CPU

# Photos at sizes the 800-px models take as they are: landscape, portrait, and a 3:2 landscape.
PHOTOS = {"chelsea.jpg": (1333, 800), "rocket.jpg": (800, 1333), "coffee.jpg": (1200, 800)}
LABELS = range(60, 65)
SCORE_THRESHOLD = 0.05  # every candidate of labels 60-64 scores about 0.17 or more; the others about 0
NMS_THRESHOLD = 0.5  # torchvision's box_nms_thresh for these models


@pytest.fixture(scope="module")
def high_label_weights(tmp_path_factory):
    """The tests' checkpoint with the classifier's biases lowered by 30 for every label but 60-64."""
    state = torch.load(light_checkpoint(), weights_only=True)["model"]
    bias = state["roi_heads.box_predictor.cls_score.bias"]
    others = torch.ones_like(bias, dtype=torch.bool)
    others[0] = False
    others[list(LABELS)] = False
    bias[others] -= 30
    path = tmp_path_factory.mktemp("weights") / "high-labels.pt"
    torch.save({"model": state}, path)
    return path


@pytest.fixture(scope="module")
def photos():
    return [np.asarray(Image.open(SAMPLES_DIR / name).convert("RGB").resize(size)) for name, size in PHOTOS.items()]


class Recorded:
    """What reached torchvision's NMS and the ROI pooler in one detector's calls."""

    def __init__(self):
        self.nms: list[tuple[torch.dtype, int]] = []  # (dtype, boxes) of each NMS call
        self.pooled: list[torch.dtype] = []  # the dtype of the proposals each ROI pooling call was given


@pytest.fixture(scope="module", params=[
    "cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def detections(request, high_label_weights, photos):
    """Each precision's detections of the photos (Detector.detect, one image a model batch, as the job
    calls it), and what reached NMS and the ROI pooler; on the CPU, and on the GPU where CUDA works (the
    detector takes the GPU when Ray gave it one: here Ray's assignment is stood in for)."""
    spec = ModelSpec(name=LIGHT, weights=str(high_label_weights), score_threshold=SCORE_THRESHOLD, min_size=800,
                     max_size=1333, max_detections=100)
    found = {}
    nms = torchvision.ops.boxes.nms  # batched_nms calls it by this module's name, on either path
    for precision in ("fp32", "bf16", "fp16"):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(device, "assigned_gpu_ids", lambda: [0] if request.param == "cuda" else [])
            detector = Detector(spec, num_threads=2, precision=precision, batch_size=1)
        assert detector.device.type == request.param
        recorded = Recorded()

        def recording_nms(boxes, scores, iou_threshold, recorded=recorded):
            recorded.nms.append((boxes.dtype, len(boxes)))
            return nms(boxes, scores, iou_threshold)

        pooler = detector.model.model.roi_heads.box_roi_pool
        hook = pooler.register_forward_pre_hook(lambda module, args, recorded=recorded: recorded.pooled.extend(b.dtype for b in args[1]))
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(torchvision.ops.boxes, "nms", recording_nms)
            found[precision] = (detector.detect(photos), recorded)
        hook.remove()
    return found


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_keeps_the_boxes_of_every_nms_and_of_roi_pooling_in_float32(detections, precision):
    """Per image: the RPN's NMS over 3 pyramid levels x its 150 best anchors, then one NMS over the 150
    proposals x 5 labels (the one-call path, under its 1,000-box limit); both on float32 boxes, and the
    ROI pooler (which assigns pyramid levels by box area) is given float32 proposals."""
    found, recorded = detections[precision]
    assert recorded.nms == [(torch.float32, 450), (torch.float32, 750)] * len(PHOTOS)
    assert recorded.pooled == [torch.float32] * len(PHOTOS)
    assert all(detection["boxes"].dtype == np.float32 for detection in found)


def overlapping_pairs(detection: dict) -> list[tuple[int, int, float]]:
    """Pairs of detections of one label whose boxes overlap above the NMS threshold (IoU in float64)."""
    boxes = torch.from_numpy(detection["boxes"]).double()
    pairs = []
    for label in np.unique(detection["labels"]):
        index = np.flatnonzero(detection["labels"] == label)
        iou = torchvision.ops.box_iou(boxes[index], boxes[index])
        for a, b in zip(*np.triu_indices(len(index), 1)):
            if iou[a, b] > NMS_THRESHOLD:
                pairs.append((int(index[a]), int(index[b]), round(float(iou[a, b]), 3)))
    return pairs


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_no_two_kept_detections_of_a_label_overlap_above_the_nms_threshold(detections, precision):
    found, _ = detections[precision]
    assert [len(detection["labels"]) for detection in found] == [100] * len(PHOTOS)
    assert {int(label) for detection in found for label in detection["labels"]} <= set(LABELS)
    assert [overlapping_pairs(detection) for detection in found] == [[]] * len(PHOTOS)


def twins(reference: dict, other: dict, count: int) -> list[bool]:
    """For each of reference's first `count` detections (highest score first): whether `other` has one of
    the same label with IoU >= 0.9 and a score within 0.02."""
    found = []
    for box, score, label in list(zip(reference["boxes"], reference["scores"], reference["labels"]))[:count]:
        same = other["labels"] == label
        iou = torchvision.ops.box_iou(torch.from_numpy(box[None]), torch.from_numpy(other["boxes"][same]))[0].numpy()
        found.append(bool(np.any((iou >= 0.9) & (np.abs(other["scores"][same] - score) <= 0.02))))
    return found


@pytest.mark.parametrize("precision,top_five,share", [("bf16", 4, 0.7), ("fp16", 5, 0.9)])
def test_half_precision_detections_match_float32_ones_within_the_stated_bound(detections, precision, top_five, share):
    """The bound: of the five highest-scoring float32 detections of every image, at least four under
    bfloat16 and all five under float16 have a twin (same label, IoU >= 0.9, score within 0.02), and so
    do at least 70% of all 100 under bfloat16 and 90% under float16.

    Why these numbers: the geometry is float32 under every precision, so the detections differ only
    through the layers' rounding, 2^-9 of a value in bfloat16 (8 significant bits) and 2^-12 in float16
    (11). The tests' model is a seeded light model (BatchNorm calibrated on the bundled photos,
    tests/support/models.py), and its 100 detections score within about 0.03 of each other: the rounding
    reorders some near-ties among candidates, and a reordered candidate suppresses a different neighbour
    in NMS. That is what the rest of the share is made of, more of it in bfloat16, where it can reach the
    top five: on an H200 machine (torch 2.11), one of the third photo's top five went that way under
    bfloat16, both on its GPU and on its CPU. Measured on this project's 2-core CPU: 81-88% (bfloat16)
    and 95-96% (float16) have twins, and all of the top five. With the whole model under autocast (before
    app.precision), 48-51% and 71-82%, and 1 to 4 of the top five went missing in every image under
    bfloat16."""
    reference, _ = detections["fp32"]
    found, _ = detections[precision]
    top = [sum(twins(want, got, 5)) for want, got in zip(reference, found)]
    shares = [round(sum(twins(want, got, len(want["labels"]))) / len(want["labels"]), 2) for want, got in zip(reference, found)]
    print(f"{precision}: twins of the top five {top}, of all {shares}")  # shown with pytest -rP (scripts/gpu-check.sh)
    assert min(top) >= top_five and min(shares) >= share, (top, shares)


# The layers each precision runs in half precision: the backbone and FPN, the RPN head's convolutions, the
# box head and the predictor (app.precision).
HALF_PRECISION_PARTS = ("backbone", "rpn.head", "roi_heads.box_head", "roi_heads.box_predictor")


@pytest.mark.parametrize("precision,dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_every_layer_of_the_half_precision_parts_computes_in_the_precision_asked_for(precision, dtype):
    """Through the detector as the job builds and calls it (Detector, then its detect): forward hooks on
    every convolution and linear layer of those parts record the dtype of what each returned. A precision
    setting that did nothing (the model left whole in float32) fails here: checked by hand with
    app.detector.mixed_precision replaced by one that returns the model unchanged (fp16 and bf16 failed).
    One small photo: float16 convolutions are slow on a CPU."""
    spec = ModelSpec(name=LIGHT, weights=str(light_checkpoint()), score_threshold=0.0, min_size=320, max_size=640)
    photo = np.asarray(Image.open(SAMPLES_DIR / "chelsea.jpg").convert("RGB").resize((426, 320)))
    detector = Detector(spec, num_threads=2, precision=precision, batch_size=1)
    network = detector.model.model
    layers = {f"{part}.{name}": module for part in HALF_PRECISION_PARTS
              for name, module in network.get_submodule(part).named_modules()
              if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear))}
    returned: dict[str, set] = {name: set() for name in layers}
    hooks = [module.register_forward_hook(lambda module, args, output, name=name: returned[name].add(output.dtype))
             for name, module in layers.items()]
    try:
        found = detector.detect([photo])
    finally:
        for hook in hooks:
            hook.remove()
    assert len(layers) == 73  # the light model's: 66 in the backbone and FPN, 3 in the RPN head, 2 + 2 after
    assert {name: dtypes for name, dtypes in returned.items() if dtypes != {dtype}} == {}
    assert [len(detection["labels"]) for detection in found] == [100]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_manifest_records_the_precision_and_ieee_float32_on_gpus(tmp_path, precision):
    cfg = compose_config([f"inference.precision={precision}", f"output.path={tmp_path}"])
    spec = ModelSpec(name=LIGHT, weights="none", score_threshold=0.5, min_size=320, max_size=640)
    output = storage.resolve(str(tmp_path))
    write_manifest(cfg, spec, Summary(output_path=str(tmp_path), inputs=0, processed=0, ok=0, errors=0, detections=0), output)
    assert read_manifest(output)["numerics"] == {"precision": precision, "gpu_float32": "ieee", "channels_last": False,
                                                 "cudnn_benchmark": False}


def test_channels_last_convolutions_compute_in_that_layout_and_detect_what_the_default_layout_does():
    """inference.channels_last: every convolution's weight is laid out channels-last, every convolution of
    the backbone and FPN returns channels-last activations (forward hooks; with the setting ignored the
    first check fails), and the detections match the default layout's: the same labels, scores and boxes
    within float32 rounding (the CPU's convolution kernels differ by layout)."""
    spec = ModelSpec(name=LIGHT, weights=str(light_checkpoint()), score_threshold=0.0, min_size=320, max_size=640)
    photo = np.asarray(Image.open(SAMPLES_DIR / "chelsea.jpg").convert("RGB").resize((426, 320)))
    default = Detector(spec, num_threads=2, batch_size=1).detect([photo])[0]
    detector = Detector(spec, num_threads=2, batch_size=1, channels_last=True)
    convolutions = {name: module for name, module in detector.model.named_modules() if isinstance(module, torch.nn.Conv2d)}
    assert {name for name, module in convolutions.items()
            if not module.weight.is_contiguous(memory_format=torch.channels_last)} == set()
    layouts: dict[str, bool] = {}

    def record(name: str, output: torch.Tensor) -> None:
        layouts[name] = output.is_contiguous(memory_format=torch.channels_last)

    hooks = [module.register_forward_hook(lambda module, args, output, name=name: record(name, output))
             for name, module in convolutions.items() if name.startswith("model.backbone.")]
    found = detector.detect([photo])[0]
    for hook in hooks:
        hook.remove()
    assert len(layouts) == 66 and {name for name, channels_last in layouts.items() if not channels_last} == set()
    np.testing.assert_array_equal(found["labels"], default["labels"])
    np.testing.assert_allclose(found["scores"], default["scores"], rtol=1e-4)
    np.testing.assert_allclose(found["boxes"], default["boxes"], atol=1e-2)


def test_the_rpn_head_takes_the_fpns_half_precision_features_with_the_same_detections_as_their_round_trip():
    """Under bf16 the RPN head's convolutions are given the FPN's bfloat16 features themselves, not their
    float32 copies cast back by autocast, and the detections are bit-identical to the round trip's (the
    head with take_sources off): half to float32 to half is exact, in float16 too."""
    spec = ModelSpec(name=LIGHT, weights=str(light_checkpoint()), score_threshold=0.0, min_size=320, max_size=640)
    photo = np.asarray(Image.open(SAMPLES_DIR / "chelsea.jpg").convert("RGB").resize((426, 320)))
    detector = Detector(spec, num_threads=2, precision="bf16", batch_size=1)
    network = detector.model.model
    from_fpn, to_head = [], []
    network.backbone.module.register_forward_hook(lambda module, args, output: from_fpn.append(list(output.values())))
    network.rpn.head.module.register_forward_pre_hook(lambda module, args: to_head.append(list(args[0])))
    shortcut = detector.detect([photo])[0]
    network.rpn.head.take_sources = False
    round_trip = detector.detect([photo])[0]
    assert [[tensor.dtype for tensor in features] for features in to_head] == [[torch.bfloat16] * 3, [torch.float32] * 3]
    assert [a is b for a, b in zip(to_head[0], from_fpn[0])] == [True] * 3
    assert all(np.array_equal(shortcut[key], round_trip[key]) for key in ("boxes", "scores", "labels"))
    assert len(shortcut["labels"]) == 100
