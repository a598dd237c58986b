"""The model built without random initialisation before its weights load (app.model.build_model): on
torch's meta device, its weights then assigned. Its parameters and buffers (BatchNorm's and
FrozenBatchNorm's statistics included) and its detections must be bit-identical to the model built as
before, randomly initialised and then loaded; with model.weights=none the seeded random initialisation
stays the weights. And the detector's start-up, part by part, in one debug line."""

import logging
import re

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.models import get_model
from torchvision.ops.misc import FrozenBatchNorm2d

from app.config import SAMPLES_DIR
from app.detector import Detector
from app.model import RANDOM_INIT_SEED, ModelSpec, build_model, pretrained_weights_file
from tests.support.models import LIGHT, light_checkpoint

OPTIONS = dict(box_score_thresh=0.0, box_detections_per_img=100, min_size=320, max_size=640)


def spec_for(weights: str, name: str = LIGHT) -> ModelSpec:
    return ModelSpec(name=name, weights=weights, score_threshold=0.0, min_size=320, max_size=640)


def initialised_then_loaded(name: str, state_dict: dict, **kwargs) -> torch.nn.Module:
    """The model as build_model made it before: randomly initialised (seeded), then its weights copied in."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        model = get_model(name, weights=None, weights_backbone=None, num_classes=91, **OPTIONS, **kwargs)
    model.load_state_dict(state_dict)
    return model.eval()


def assert_same_model(built: torch.nn.Module, reference: torch.nn.Module) -> None:
    """The same tensors, bit for bit and dtype for dtype, and the same detections in two photos."""
    got, want = built.state_dict(), reference.state_dict()
    assert list(got) == list(want)
    assert [key for key in want if got[key].dtype != want[key].dtype or not torch.equal(got[key], want[key])] == []
    photos = [torch.from_numpy(np.array(Image.open(SAMPLES_DIR / name).convert("RGB").resize((426, 320)))).permute(2, 0, 1).float() / 255
              for name in ("chelsea.jpg", "coffee.jpg")]
    with torch.inference_mode():
        found, expected = built(photos), reference(photos)
    assert [len(detections["boxes"]) for detections in expected] == [100, 100]
    for detections, wanted in zip(found, expected):
        assert all(torch.equal(detections[key], wanted[key]) for key in ("boxes", "scores", "labels"))


def test_a_checkpoint_is_assigned_to_a_model_built_without_initialisation_and_detects_the_same():
    state_dict = torch.load(light_checkpoint(), weights_only=True)["model"]
    seconds = {}
    model, _ = build_model(spec_for(str(light_checkpoint())), seconds)
    assert sorted(seconds) == ["model build", "weights load"]
    assert sum(isinstance(module, torch.nn.BatchNorm2d) for module in model.modules()) == 46
    assert_same_model(model, initialised_then_loaded(LIGHT, state_dict))


def test_a_half_precision_checkpoint_loads_as_float32_as_it_did_when_copied_in(tmp_path):
    state_dict = torch.load(light_checkpoint(), weights_only=True)["model"]
    halved = {key: value.half() if value.is_floating_point() else value for key, value in state_dict.items()}
    torch.save({"model": halved}, tmp_path / "half.pt")
    model, _ = build_model(spec_for(str(tmp_path / "half.pt")))
    assert {tensor.dtype for tensor in model.state_dict().values()} == {torch.float32, torch.int64}
    assert_same_model(model, initialised_then_loaded(LIGHT, halved))


def test_a_checkpoint_that_lacks_a_buffer_is_refused(tmp_path):
    state_dict = torch.load(light_checkpoint(), weights_only=True)["model"]
    del state_dict["backbone.body.0.1.running_var"]
    torch.save({"model": state_dict}, tmp_path / "partial.pt")
    with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: "backbone.body.0.1.running_var"'):
        build_model(spec_for(str(tmp_path / "partial.pt")))


def test_pretrained_weights_are_assigned_with_frozen_batchnorm_and_detect_as_torchvision_loads_them(monkeypatch, tmp_path):
    """torchvision's pretrained weights are stood in (no network here): the tests' checkpoint under the
    pretrained file's name in a TORCH_HOME of the test's own, its BatchNorm counters dropped, as
    FrozenBatchNorm, which torchvision builds for pretrained models, has none."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    state_dict = torch.load(light_checkpoint(), weights_only=True)["model"]
    frozen = {key: value for key, value in state_dict.items() if not key.endswith("num_batches_tracked")}
    path = pretrained_weights_file(LIGHT)
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(frozen, path)
    model, categories = build_model(spec_for("DEFAULT"))
    reference = get_model(LIGHT, weights="DEFAULT", **OPTIONS).eval()
    assert sum(isinstance(module, FrozenBatchNorm2d) for module in model.modules()) == 46
    assert len(categories) == 91
    assert_same_model(model, reference)


def test_random_initialisation_stays_the_weights_of_model_weights_none():
    model, _ = build_model(spec_for("none"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        reference = get_model(LIGHT, weights=None, weights_backbone=None, num_classes=91, **OPTIONS).eval()
    assert_same_model(model, reference)
    assert not any(tensor.is_meta for tensor in model.state_dict().values())


def test_the_detectors_start_up_is_one_debug_line_of_its_parts_after_its_first_model_call(caplog):
    detector = Detector(spec_for(str(light_checkpoint())), num_threads=1, batch_size=1)
    photo = np.asarray(Image.open(SAMPLES_DIR / "chelsea.jpg").convert("RGB").resize((426, 320)))
    with caplog.at_level(logging.DEBUG, logger="app.detector"):
        assert caplog.messages == []
        detector.detect([photo, photo])  # two model calls
    seconds = r"(\d+\.\d\d)"
    assert len(caplog.messages) == 1
    parts = re.fullmatch(rf"detector start-up \(s\): imports {seconds}, device check {seconds}, model build {seconds}, "
                         rf"weights load {seconds}, to device {seconds}, first forward {seconds}", caplog.messages[0])
    assert parts is not None, caplog.messages[0]
    assert float(parts.group(6)) > 0
