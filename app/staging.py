"""Staging a model batch's pixels to the device and its detections back to the host. On a GPU the uint8
pixels of a batch are packed into one pinned buffer and copied in one non-blocking copy on a copy stream
(`to_device`); the detections come back in three copies per model batch (`to_host`). Used by
app.detector.Detector.
"""

import math
import warnings
from typing import NamedTuple, Optional, Sequence

import numpy as np
import torch


class Staged(NamedTuple):
    """A model batch's images on the device, and the event its copy completes (CUDA only)."""

    tensors: list[torch.Tensor]
    copied: Optional[torch.cuda.Event] = None

    def ready(self) -> list[torch.Tensor]:
        """The tensors, safe to use on the current stream."""
        if self.copied is not None:
            stream = torch.cuda.current_stream()
            stream.wait_event(self.copied)
            for tensor in self.tensors:
                tensor.record_stream(stream)  # their memory is not reused before this stream is done
        return self.tensors


def to_device(images: Sequence[np.ndarray], device: torch.device, copy_stream: Optional[torch.cuda.Stream] = None) -> Staged:
    """HWC uint8 images (or views of part of one: tiles) as CHW uint8 tensors on device.

    On CUDA the images are packed into one pinned host buffer and copied in one non-blocking transfer
    on copy_stream. On the CPU the tensors are views of the images: nothing is copied."""
    if device.type != "cuda":
        with warnings.catch_warnings():
            # Decoded pixels are read-only views of Arrow buffers; the model only reads them.
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            return Staged([torch.from_numpy(image).permute(2, 0, 1) for image in images])
    host = torch.empty(sum(image.size for image in images), dtype=torch.uint8, pin_memory=True)
    copy_stream = copy_stream or torch.cuda.current_stream(device)
    with torch.cuda.stream(copy_stream):
        flat = packed(images, host).to(device, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record(copy_stream)
    return Staged(unpacked(flat, [image.shape for image in images]), copied)


def packed(images: Sequence[np.ndarray], buffer: torch.Tensor) -> torch.Tensor:
    """The images copied one after another into a flat uint8 buffer (a tile, a view of its scene, in one
    copy); returns the buffer."""
    staging, offset = buffer.numpy(), 0
    for image in images:
        np.copyto(staging[offset : offset + image.size].reshape(image.shape), image)
        offset += image.size
    return buffer


def unpacked(flat: torch.Tensor, shapes: Sequence[tuple[int, ...]]) -> list[torch.Tensor]:
    """The HWC images of a flat buffer `packed` filled, as CHW views of it."""
    tensors, offset = [], 0
    for shape in shapes:
        size = math.prod(shape)
        tensors.append(flat[offset : offset + size].view(shape).permute(2, 0, 1))
        offset += size
    return tensors


def to_host(outputs: list[dict[str, torch.Tensor]]) -> list[dict[str, np.ndarray]]:
    """Each image's boxes, scores (float32, also from half-precision outputs) and labels on the host, in
    three copies for the whole batch."""
    counts = [len(output["labels"]) for output in outputs]
    flat = {
        key: torch.cat([output[key] for output in outputs]).to("cpu", torch.float32 if key != "labels" else torch.int64).numpy()
        for key in ("boxes", "scores", "labels")
    }
    splits = np.cumsum(counts)[:-1]
    per_key = {key: np.split(values, splits) for key, values in flat.items()}
    return [{key: per_key[key][i] for key in per_key} for i in range(len(outputs))]
