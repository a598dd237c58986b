"""The detector stage: a Ray Data class UDF that runs the model once per actor over batches of decoded
images and returns result rows (app.results.RESULT_SCHEMA), boxes in original pixels.

On a GPU, a batch's uint8 pixels travel to the device in one pinned, non-blocking copy and become
floats there; the model may run under fp16/bf16 autocast; and a CUDA out-of-memory error splits the
batch in halves and retries them instead of failing the actor.
"""

import logging
from typing import Callable, Optional, Sequence

import numpy as np
import pyarrow as pa
import ray
import torch

from app.model import ModelSpec, build_model
from app.results import RESULT_SCHEMA

log = logging.getLogger("app")

AUTOCAST_DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def choose_device() -> torch.device:
    """CUDA when Ray gave this actor a GPU and torch can see one, else CPU."""
    if ray.is_initialized() and ray.get_gpu_ids() and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def scale_boxes(boxes: np.ndarray, from_size: tuple[int, int], to_size: tuple[int, int]) -> np.ndarray:
    """Map [x1, y1, x2, y2] boxes from an image of from_size (width, height) onto one of to_size."""
    scale_x = to_size[0] / from_size[0]
    scale_y = to_size[1] / from_size[1]
    return (boxes * np.array([scale_x, scale_y, scale_x, scale_y], dtype=np.float32)).astype(np.float32)


def to_device(images: Sequence[np.ndarray], device: torch.device, pin: bool) -> list[torch.Tensor]:
    """HWC uint8 images as CHW float tensors in [0, 1] on device.

    The uint8 pixels (a quarter of the float32 bytes) are packed into one host buffer, pinned when
    `pin`, and copied to the device in one non-blocking transfer; the conversion to float runs there."""
    sizes = [image.size for image in images]
    host = torch.empty(sum(sizes), dtype=torch.uint8, pin_memory=pin)
    offset = 0
    staging = host.numpy()  # the same memory, written through numpy: the images may be read-only views
    for image, size in zip(images, sizes):
        staging[offset : offset + size] = image.reshape(-1)
        offset += size
    flat = host.to(device, non_blocking=pin)
    tensors, offset = [], 0
    for image, size in zip(images, sizes):
        pixels = flat[offset : offset + size].view(image.shape)
        tensors.append(pixels.permute(2, 0, 1).float().div_(255.0))
        offset += size
    return tensors


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError)


class SplittingRunner:
    """Calls `model` on a list of inputs; when it runs out of device memory, splits the list in halves
    and runs each half, down to single inputs. After an out-of-memory error on n inputs, later calls
    take at most n // 2 at a time, so one tight batch does not cost an error on every batch after it.
    A single input that still runs out of memory after the cache is released and it is tried once more
    raises: nothing smaller can be tried."""

    def __init__(self, model: Callable[[list], list], release_memory: Callable[[], None] = lambda: None):
        self.model = model
        self.release_memory = release_memory
        self.limit: Optional[int] = None  # most inputs per model call, set by an out-of-memory error
        self.splits = 0

    def __call__(self, inputs: list) -> list:
        results = []
        step = self.limit or len(inputs)
        for start in range(0, len(inputs), step):
            results.extend(self.run(inputs[start : start + step]))
        return results

    def run(self, inputs: list, retried: bool = False) -> list:
        try:
            return self.model(inputs)
        except Exception as error:
            if not is_out_of_memory(error) or (len(inputs) == 1 and retried):
                raise
            # Handled below, outside the except block: the error's traceback holds the failed call's tensors.
            failed = str(error)
        self.release_memory()
        if len(inputs) == 1:
            log.warning("out of device memory on a single image; retrying it once: %s", failed)
            return self.run(inputs, retried=True)
        self.splits += 1
        half = len(inputs) // 2
        self.limit = half if self.limit is None else min(self.limit, half)
        log.warning("out of device memory on a batch of %d images; splitting it in halves: %s", len(inputs), failed)
        return self.run(inputs[:half]) + self.run(inputs[half:])


def release_cuda_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class Detector:
    """Built once per actor: loads the model, then detects objects in each batch it is called with.

    num_threads is the number of CPUs Ray reserved for the actor; torch uses that many threads.
    precision "fp16" or "bf16" runs the model under autocast on the device (GPUs with tensor cores)."""

    def __init__(self, spec: ModelSpec, num_threads: int, precision: str = "fp32"):
        torch.set_num_threads(max(1, num_threads))
        self.device = choose_device()
        if precision not in AUTOCAST_DTYPES:
            raise ValueError(f"precision {precision!r} is not one of {', '.join(AUTOCAST_DTYPES)}")
        self.autocast_dtype = AUTOCAST_DTYPES[precision]
        model, self.categories = build_model(spec)
        self.model = model.to(self.device)
        self.runner = SplittingRunner(self.forward, release_cuda_memory if self.device.type == "cuda" else lambda: None)

    def forward(self, images: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
        tensors = to_device(images, self.device, pin=self.device.type == "cuda")
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            outputs = self.model(tensors)
        # Scores and boxes may come out in half precision under autocast: results are float32.
        return [
            {key: (value.float() if value.is_floating_point() else value).cpu().numpy() for key, value in output.items()}
            for output in outputs
        ]

    @torch.inference_mode()
    def predict(self, images: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
        """Run the model on HWC uint8 images; returns boxes, scores and labels per image, on the CPU."""
        if not images:
            return []
        return self.runner(images)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.drop_columns(["pixels"]).to_pydict()
        pixels = batch.column("pixels")
        ok = [i for i, kind in enumerate(rows["error_kind"]) if kind is None]
        images = [
            np.frombuffer(pixels[i].as_buffer(), dtype=np.uint8).reshape(rows["pixel_height"][i], rows["pixel_width"][i], 3)
            for i in ok
        ]
        detections = dict(zip(ok, self.predict(images)))
        result = {name: [] for name in RESULT_SCHEMA.names}
        for i, path in enumerate(rows["path"]):
            found = detections.get(i)
            if found is None:
                boxes, scores, labels = np.zeros((0, 4), np.float32), [], []
            else:
                model_size = (rows["pixel_width"][i], rows["pixel_height"][i])
                boxes = scale_boxes(found["boxes"], model_size, (rows["width"][i], rows["height"][i]))
                scores, labels = found["scores"].tolist(), found["labels"].tolist()
            result["path"].append(path)
            result["width"].append(rows["width"][i])
            result["height"].append(rows["height"][i])
            result["boxes"].append(boxes.tolist())
            result["scores"].append(scores)
            result["labels"].append(labels)
            result["label_names"].append([self.categories[label] for label in labels])
            result["num_detections"].append(len(labels))
            result["error_kind"].append(rows["error_kind"][i])
            result["error"].append(rows["error"][i])
        return pa.table(result, schema=RESULT_SCHEMA)
