"""Mixed precision for torchvision's detection models: half precision where the network's layers compute,
float32 wherever a box is made, compared or measured.

Running a whole FasterRCNN under autocast also runs its geometry in half precision: anchors take the
features' dtype, box decoding the regression's, and torchvision's batched NMS keeps classes apart by
adding label x (largest coordinate + 1) to the boxes. For a label above 50 on an 800x1333 input that
offset passes 65,504 (float16 overflows to inf) or is rounded to a multiple of 512 (bfloat16 collapses
the boxes onto each other): suppression then fails and near-duplicate detections survive. The RPN's NMS
(offsets by pyramid level) and the ROI pooler's level assignment (box areas, above 65,504 for any box
larger than 256x256) are hit the same way.

So the layers that hold nearly all of the arithmetic (backbone and FPN, the RPN head's convolutions, the
box head and predictor) run under autocast and hand float32 to everything after them: anchors, box
decoding, every NMS, ROI pooling and its level assignment, and the detections' post-processing all run in
float32, outside autocast.
"""

from typing import Any, Optional

import torch
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN

AUTOCAST_DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def to_float32(value: Any) -> Any:
    """Every floating tensor in value (a tensor, or dicts, lists and tuples of them) as float32."""
    if isinstance(value, torch.Tensor):
        return value.float() if value.is_floating_point() else value
    if isinstance(value, dict):
        return type(value)((key, to_float32(item)) for key, item in value.items())
    if isinstance(value, (list, tuple)):
        return type(value)(to_float32(item) for item in value)
    return value


def device_type(value: Any) -> str:
    """The device type of the first tensor in value (a tensor, or a list, tuple or dict of them)."""
    if isinstance(value, torch.Tensor):
        return value.device.type
    items = value.values() if isinstance(value, dict) else value
    return device_type(next(iter(items)))


class HalfPrecision(torch.nn.Module):
    """Runs `module` under autocast to `dtype` on its inputs' device, and returns its outputs in float32."""

    def __init__(self, module: torch.nn.Module, dtype: torch.dtype):
        super().__init__()
        self.module, self.dtype = module, dtype

    def forward(self, inputs: Any) -> Any:
        with torch.autocast(device_type(inputs), dtype=self.dtype):
            outputs = self.module(inputs)
        return to_float32(outputs)


def mixed_precision(model: GeneralizedRCNN, dtype: Optional[torch.dtype]) -> GeneralizedRCNN:
    """The model with its layers in half precision (dtype) and its geometry in float32; unchanged for
    dtype None. The model must not already run under autocast: call it outside any autocast region."""
    if dtype is None:
        return model
    model.backbone = HalfPrecision(model.backbone, dtype)
    model.rpn.head = HalfPrecision(model.rpn.head, dtype)
    model.roi_heads.box_head = HalfPrecision(model.roi_heads.box_head, dtype)
    model.roi_heads.box_predictor = HalfPrecision(model.roi_heads.box_predictor, dtype)
    return model
