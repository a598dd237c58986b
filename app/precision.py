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

The FPN's features go to the RPN head and to ROI pooling. Pooling takes the float32 copies; the RPN head
takes the half-precision features themselves (each float32 copy carries its source, HALF_SOURCE), where
autocast would otherwise cast the copies back to half: the same numbers (half to float32 to half is exact),
without a cast of every pyramid level.
"""

from typing import Any, Optional

import torch
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN

AUTOCAST_DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


# The attribute of a float32 copy that holds the half-precision tensor it was made from.
HALF_SOURCE = "half_precision_source"


def to_float32(value: Any, keep_source: bool = False) -> Any:
    """Every floating tensor in value (a tensor, or dicts, lists and tuples of them) as float32; with
    keep_source, each new float32 copy holds the tensor it was made from (HALF_SOURCE)."""
    if isinstance(value, torch.Tensor):
        if not value.is_floating_point() or value.dtype == torch.float32:
            return value
        copy = value.float()
        if keep_source:
            setattr(copy, HALF_SOURCE, value)
        return copy
    if isinstance(value, dict):
        return type(value)((key, to_float32(item, keep_source)) for key, item in value.items())
    if isinstance(value, (list, tuple)):
        return type(value)(to_float32(item, keep_source) for item in value)
    return value


def device_type(value: Any) -> str:
    """The device type of the first tensor in value (a tensor, or a list, tuple or dict of them)."""
    if isinstance(value, torch.Tensor):
        return value.device.type
    items = value.values() if isinstance(value, dict) else value
    return device_type(next(iter(items)))


def half_sources(value: Any) -> Any:
    """value with each float32 copy that holds its half-precision source (to_float32) replaced by it; the
    copy lets go of it, so that it is freed once used."""
    if isinstance(value, torch.Tensor):
        source = getattr(value, HALF_SOURCE, value)
        if source is not value:
            delattr(value, HALF_SOURCE)
        return source
    if isinstance(value, (list, tuple)):
        return type(value)(half_sources(item) for item in value)
    return value


class HalfPrecision(torch.nn.Module):
    """Runs `module` under autocast to `dtype` on its inputs' device, and returns its outputs in float32.
    keep_sources: its float32 outputs hold the half-precision ones (the FPN's, for the RPN head);
    take_sources: it takes the half-precision sources of its float32 inputs where they have them."""

    def __init__(self, module: torch.nn.Module, dtype: torch.dtype, keep_sources: bool = False, take_sources: bool = False):
        super().__init__()
        self.module, self.dtype = module, dtype
        self.keep_sources, self.take_sources = keep_sources, take_sources

    def forward(self, inputs: Any) -> Any:
        if self.take_sources:
            inputs = half_sources(inputs)
        with torch.autocast(device_type(inputs), dtype=self.dtype):
            outputs = self.module(inputs)
        return to_float32(outputs, self.keep_sources)


def mixed_precision(model: GeneralizedRCNN, dtype: Optional[torch.dtype]) -> GeneralizedRCNN:
    """The model with its layers in half precision (dtype) and its geometry in float32; unchanged for
    dtype None. The model must not already run under autocast: call it outside any autocast region."""
    if dtype is None:
        return model
    model.backbone = HalfPrecision(model.backbone, dtype, keep_sources=True)
    model.rpn.head = HalfPrecision(model.rpn.head, dtype, take_sources=True)
    model.roi_heads.box_head = HalfPrecision(model.roi_heads.box_head, dtype)
    model.roi_heads.box_predictor = HalfPrecision(model.roi_heads.box_predictor, dtype)
    return model
