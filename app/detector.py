"""The detector: pixels in, detections out. Built once in each actor of the detector stage
(app.detector_stage), it loads the model; `Detector.detect` takes decoded HWC uint8 pixels and returns
each image's boxes (in the pixels it was given), scores and label ids. Turning those into result rows is
the stage's job.

How it keeps the device busy:
- The images of a call are grouped into model batches by shape (`shape_batches`): the model pads every
  image of a batch to the batch's largest one, so a landscape and a portrait photo together cost about
  1.4x the pixels of each alone.
- A staging thread copies the next model batch's uint8 pixels to the device (on a GPU: packed into one
  pinned buffer, one non-blocking copy on a copy stream) while the device runs the current batch.
- The model takes uint8 pixels at its input size: they become floats on the device, and torchvision's
  transform does not resize them a second time (`PixelModel`).
- Detections come back to the host in three copies per model batch (app.staging holds both copies).
- Under fp16/bf16 the model's layers run in half precision and its box geometry in float32 (app.precision).
Running out of device memory splits the batch in halves and retries them instead of failing the actor
(app.out_of_memory).
"""

import logging
import math
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import NamedTuple, Optional, Sequence

IMPORTS_STARTED = time.perf_counter()  # the actor's start-up breakdown counts the imports below

import numpy as np
import torch
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from app.calibration import TIMED_CALLS, CalibrationOptions, Trial, calibrated_batch_size
from app.decode import model_input_size
from app.device import (DeviceError, cap_device_memory, check_cuda_allocator, choose_device, configure_cuda_allocator,
                        device_name, precision_problem, set_cudnn_autotune, set_float32_math)
from app.model import ModelSpec, build_model
from app.out_of_memory import SplittingRunner, is_out_of_memory, release_cuda_memory
from app.precision import AUTOCAST_DTYPES, mixed_precision
from app.staging import Staged, to_device, to_host
from app.tiling import TilingOptions

# Seconds this module's imports took (torch and torchvision, unless the process had them already).
IMPORT_SECONDS = time.perf_counter() - IMPORTS_STARTED

log = logging.getLogger(__name__)

# A model batch may pad its images to at most this much more than the pixels they need on their own.
MAX_BATCH_PADDING = 0.2
# torchvision's detection transform pads a batch's height and width up to multiples of this.
SIZE_DIVISIBLE = 32


def padded(length: int) -> int:
    return math.ceil(length / SIZE_DIVISIBLE) * SIZE_DIVISIBLE


def shape_batches(sizes: Sequence[tuple[int, int]], batch_size: int, max_padding: float = MAX_BATCH_PADDING) -> list[list[int]]:
    """Indices of `sizes` ((width, height) at model size) grouped into model batches of at most batch_size.

    Images are taken in order of aspect ratio, and a batch is closed before an image that would make its
    padded pixels (its largest width x its largest height x its images) exceed (1 + max_padding) times
    the pixels its images need alone (each rounded up to multiples of 32 as the model does anyway)."""
    order = sorted(range(len(sizes)), key=lambda i: (sizes[i][0] / sizes[i][1], sizes[i][0] * sizes[i][1]))
    batches: list[list[int]] = []
    current: list[int] = []
    width = height = own = 0
    for i in order:
        w, h = padded(sizes[i][0]), padded(sizes[i][1])
        grown = max(width, w) * max(height, h) * (len(current) + 1)
        if current and (len(current) == batch_size or grown > (1 + max_padding) * (own + w * h)):
            batches.append(current)
            current, width, height, own = [], 0, 0, 0
        current.append(i)
        width, height, own = max(width, w), max(height, h), own + w * h
    if current:
        batches.append(current)
    return batches


def batch_padding(sizes: Sequence[tuple[int, int]]) -> float:
    """The padded pixels of a model batch of images of these (width, height) sizes over the pixels they
    need alone (each rounded up to multiples of 32), minus 1: 0 when no pixel is padding."""
    widths, heights = [padded(w) for w, _ in sizes], [padded(h) for _, h in sizes]
    return max(widths) * max(heights) * len(sizes) / sum(w * h for w, h in zip(widths, heights)) - 1


class PresizedTransform(GeneralizedRCNNTransform):
    """torchvision's detection transform without the work per image that our inputs do not need, with
    the same results: an image already at the model's input size is not interpolated again (an identity
    resize still costs milliseconds per image on a CPU), the normalisation's mean and std live on the
    model's device (torchvision copies them from the host for every image), and boxes are scaled back to
    the input's size by Python numbers (torchvision copies two ratio tensors from the host per image)."""

    @classmethod
    def like(cls, transform: GeneralizedRCNNTransform) -> "PresizedTransform":
        presized = cls(transform.min_size, transform.max_size, transform.image_mean, transform.image_std,
                       size_divisible=transform.size_divisible, fixed_size=transform.fixed_size)
        return presized.train(transform.training)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("mean", torch.tensor(self.image_mean, dtype=torch.float32)[:, None, None], persistent=False)
        self.register_buffer("std", torch.tensor(self.image_std, dtype=torch.float32)[:, None, None], persistent=False)

    def normalize(self, image: torch.Tensor) -> torch.Tensor:
        if not image.is_floating_point():
            return super().normalize(image)  # raises torchvision's error
        return (image - self.mean.to(image.dtype)) / self.std.to(image.dtype)

    def resize(self, image, target=None):
        height, width = image.shape[-2:]
        at_model_size = (width, height) == model_input_size(width, height, self.min_size[-1], self.max_size)
        if at_model_size and target is None and not self.training and self.fixed_size is None:
            return image, target
        return super().resize(image, target)

    def postprocess(self, result, image_shapes, original_image_sizes):
        if self.training or any(key in output for output in result for key in ("masks", "keypoints")):
            return super().postprocess(result, image_shapes, original_image_sizes)
        for output, size, original in zip(result, image_shapes, original_image_sizes):
            output["boxes"] = scale_boxes(output["boxes"], size, original)
        return result


def scale_boxes(boxes: torch.Tensor, size: tuple[int, int], original: tuple[int, int]) -> torch.Tensor:
    """Boxes on an image of size (height, width) moved to one of size original, as torchvision's
    resize_boxes does (each ratio a float32 division), without building tensors on the device."""
    if tuple(size) == tuple(original):
        return boxes
    ratio_height, ratio_width = (float(np.float32(new) / np.float32(old)) for new, old in zip(original, size))
    xmin, ymin, xmax, ymax = boxes.unbind(1)
    return torch.stack((xmin * ratio_width, ymin * ratio_height, xmax * ratio_width, ymax * ratio_height), dim=1)


class PixelModel(torch.nn.Module):
    """A torchvision detection model that takes CHW uint8 images on its device: pixels in, boxes out.
    autocast_dtype (float16 or bfloat16) runs its layers in half precision and its geometry in float32
    (app.precision); None runs it all in float32."""

    def __init__(self, model: torch.nn.Module, autocast_dtype: Optional[torch.dtype] = None):
        super().__init__()
        model.transform = PresizedTransform.like(model.transform)
        self.model = mixed_precision(model, autocast_dtype)

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        # A multiplication by the reciprocal: CUDA computes a division by a scalar that way, so every
        # device turns the same pixels into the same floats.
        return self.model([image.float().mul_(1 / 255) for image in images])


class ModelBatch(NamedTuple):
    """One model batch of a call: which of its images it held, its seconds and its padding (batch_padding)."""

    indices: list[int]
    seconds: float
    padding: float


class ModelInput(NamedTuple):
    """One image of a model batch: its pixels on the host and, once staged, on the device."""

    pixels: np.ndarray
    tensor: Optional[torch.Tensor]


class Detector:
    """Built once per actor: loads the model, then detects objects in the images it is given.

    num_threads is the number of CPUs Ray reserved for the actor; torch uses that many threads.
    precision "fp16" or "bf16" runs the model's layers in half precision and its box geometry in float32
    (app.precision; for GPUs with tensor cores). batch_size is the most images per model call; a call
    holds several model batches, which are grouped by shape. An actor that holds a GPU torch cannot drive
    raises DeviceError before any image, unless cpu_fallback lets it run on the CPU. tiling (tiling=tiles)
    says the images are tiles (and whole images) of tiled scenes: a model batch then holds images of one
    shape only. device_share is the share of its GPU the actor holds (below 1 when actors share a GPU):
    its GPU memory is capped at that share. calibration (inference.calibrate_batch_size) has the actor
    choose its batch size, up to the options' ceiling, by timing model calls (app.calibration).
    channels_last lays the model's convolution weights out channels-last (NHWC), so that its convolutions
    compute in that layout; cudnn_benchmark has cuDNN autotune each new input shape (on a GPU)."""

    def __init__(self, spec: ModelSpec, num_threads: int, precision: str = "fp32", batch_size: int = 4,
                 cpu_fallback: bool = False, tiling: Optional[TilingOptions] = None, device_share: float = 1.0,
                 calibration: Optional[CalibrationOptions] = None, channels_last: bool = False,
                 cudnn_benchmark: bool = False):
        # The actor's start-up, part by part, logged at debug level after the first model call.
        self.startup_seconds: Optional[dict[str, float]] = {"imports": IMPORT_SECONDS}
        started = time.perf_counter()
        torch.set_num_threads(max(1, num_threads))
        if precision not in AUTOCAST_DTYPES:
            raise ValueError(f"precision {precision!r} is not one of {', '.join(AUTOCAST_DTYPES)}")
        allocator_settings = configure_cuda_allocator()
        self.device = choose_device(cpu_fallback)
        if self.device.type == "cuda":
            check_cuda_allocator(allocator_settings)
            problem = precision_problem(precision, torch.cuda.get_device_name(self.device), torch.cuda.get_device_capability(self.device))
            if problem:
                raise DeviceError(problem)
            cap_device_memory(self.device, device_share)
        set_float32_math(self.device)
        set_cudnn_autotune(self.device, cudnn_benchmark)
        self.device_name = device_name(self.device)  # as the summary and the metrics name it
        self.autocast_dtype = AUTOCAST_DTYPES[precision]
        self.spec, self.precision, self.batch_size, self.tiling = spec, precision, batch_size, tiling
        self.channels_last, self.cudnn_benchmark = channels_last, cudnn_benchmark
        self.startup_seconds["device check"] = time.perf_counter() - started
        model, self.categories = self.load_model(spec)
        started = time.perf_counter()
        self.model = model.to(self.device)
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.startup_seconds["to device"] = time.perf_counter() - started
        self.runner = SplittingRunner(self.forward, release_cuda_memory if self.device.type == "cuda" else lambda: None)
        # The share of its last call's time the device ran kernels (device_busy_share); None where unknown.
        self.device_busy: Optional[float] = None
        self.nvml_failed = False
        self.copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.stager = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stage-batch")
        if calibration is not None:
            started = time.perf_counter()
            self.batch_size = calibrated_batch_size(self.time_batch, calibration, self.calibration_key(calibration, device_share),
                                                    self.memory_limit(device_share))
            self.startup_seconds["calibration"] = time.perf_counter() - started

    def calibration_key(self, calibration: CalibrationOptions, device_share: float) -> str:
        """What a calibrated batch size holds for: its cache's key."""
        spec = self.spec
        layout = "".join(text for flag, text in ((self.channels_last, ", channels-last"), (self.cudnn_benchmark, ", cuDNN autotuned"),
                                                  (self.tiling is not None, ", tiled")) if flag)
        return (f"{self.device_name}, {spec.name} at {spec.min_size}-{spec.max_size} px, {self.precision}{layout}, "
                f"torch {torch.__version__}, {device_share:g} of the device, batch sizes up to {calibration.ceiling}")

    def memory_limit(self, device_share: float) -> Optional[int]:
        """The device memory this actor may use, in bytes; None on the CPU."""
        if self.device.type != "cuda":
            return None
        return int(torch.cuda.get_device_properties(self.device).total_memory * device_share)

    @torch.inference_mode()
    def time_batch(self, batch_size: int) -> Trial:
        """Model calls of batch_size images of the largest padded input (noise at the model's input size of
        a max_size x min_size image): their seconds per image after one to warm up, and on a GPU the
        device memory's peak. Running out of device memory is a result (seconds inf), not an error."""
        width, height = model_input_size(self.spec.max_size, self.spec.min_size, self.spec.min_size, self.spec.max_size)
        image = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
        cuda = self.device.type == "cuda"
        try:
            tensors = self.stage([image] * batch_size).ready()
            to_host(self.model(tensors))
            if cuda:
                torch.cuda.reset_peak_memory_stats(self.device)
            started = time.perf_counter()
            for _ in range(TIMED_CALLS):
                to_host(self.model(tensors))
            seconds = time.perf_counter() - started
        except Exception as error:
            if not is_out_of_memory(error):
                raise
            release_cuda_memory()
            return Trial(batch_size, math.inf)
        peak = torch.cuda.max_memory_reserved(self.device) if cuda else None
        return Trial(batch_size, seconds / (TIMED_CALLS * batch_size), peak)

    def load_model(self, spec: ModelSpec) -> tuple[torch.nn.Module, list[str]]:
        """The model (CHW uint8 images in, torchvision's detections out) and its label names. The
        benchmark's device stand-in replaces this."""
        model, categories = build_model(spec, self.startup_seconds)
        return PixelModel(model, self.autocast_dtype), categories

    def device_busy_reading(self) -> Optional[tuple[float, float]]:
        """What device_busy_share needs from a call's start: nothing on a GPU (NVML keeps its own samples).
        The benchmark's device stand-in returns its clock and busy seconds."""
        return None

    def device_busy_share(self, reading: Optional[tuple[float, float]]) -> Optional[float]:
        """The share of time the GPU ran kernels, as nvidia-smi shows it: NVML's utilisation over its last sample
        period (1/6 s to 1 s), read at the end of the call that just ran, so a sample of the call's end rather
        than a measure of the whole call. For the whole GPU, whatever else runs on it. None on a CPU, and where
        NVML cannot be read (warned once)."""
        if self.device.type != "cuda" or self.nvml_failed:
            return None
        try:
            return torch.cuda.utilization(self.device) / 100
        except Exception as error:  # no pynvml, no NVML library, a GPU NVML does not know
            self.nvml_failed = True
            log.warning("cannot read the GPU's utilisation through NVML (%s): the summary has no GPU busy share", error)
            return None

    def log_startup(self, first_forward: float) -> None:
        """One debug line with the parts of the actor's start-up, the first model call included (it pays
        for lazy module loading and, on a GPU, cuDNN's plans for the first shape)."""
        parts = {**self.startup_seconds, "first forward": first_forward}
        self.startup_seconds = None
        log.debug("detector start-up (s): %s", ", ".join(f"{name} {seconds:.2f}" for name, seconds in parts.items()))

    def stage(self, images: list[np.ndarray]) -> Staged:
        return to_device(images, self.device, self.copy_stream)

    def staged_inputs(self, staged: Future, images: list[np.ndarray]) -> list[ModelInput]:
        """A model batch staged ahead; its images unstaged if the device ran out of memory for them
        (forward stages them again, in halves if need be)."""
        try:
            tensors = staged.result().ready()
        except Exception as error:
            if not is_out_of_memory(error):
                raise
            log.warning("out of device memory while copying a batch of %d images to the device; it is copied "
                        "again with its model call: %s", len(images), error)
            return [ModelInput(pixels, None) for pixels in images]
        return [ModelInput(pixels, tensor) for pixels, tensor in zip(images, tensors)]

    def forward(self, inputs: list[ModelInput]) -> list[dict[str, np.ndarray]]:
        tensors = [item.tensor for item in inputs]
        unstaged = [k for k, tensor in enumerate(tensors) if tensor is None]
        if unstaged:
            for k, tensor in zip(unstaged, self.stage([inputs[k].pixels for k in unstaged]).ready()):
                tensors[k] = tensor
        if self.startup_seconds is None:
            return to_host(self.model(tensors))
        started = time.perf_counter()
        detections = to_host(self.model(tensors))
        self.log_startup(time.perf_counter() - started)
        return detections

    def detect(self, images: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
        """Run the model on HWC uint8 images; returns boxes (model pixels), scores and labels per image."""
        return self.detect_batches(images)[0]

    @torch.inference_mode()
    def detect_batches(self, images: list[np.ndarray]) -> tuple[list[dict[str, np.ndarray]], list[ModelBatch]]:
        """`detect`, and the model batches it ran; device_busy holds the device's busy share after. The next
        model batch is staged on the device while the current one runs. Running out of device memory anywhere in a model batch's path (staging, the
        model, the copy back) splits the batch."""
        if not images:
            return [], []
        reading = self.device_busy_reading()
        sizes = [model_input_size(image.shape[1], image.shape[0], self.spec.min_size, self.spec.max_size) for image in images]
        # Tiled, a model batch holds inputs of one padded shape: a tile padded to another input's shape
        # would be detected differently from the tile alone (as SAHI detects it).
        batches = shape_batches(sizes, self.batch_size, 0.0 if self.tiling else MAX_BATCH_PADDING)
        found: list[dict[str, np.ndarray]] = [{}] * len(images)
        ran = []
        staged = self.stager.submit(self.stage, [images[i] for i in batches[0]])
        for number, indices in enumerate(batches):
            inputs = self.staged_inputs(staged, [images[i] for i in indices])
            if number + 1 < len(batches):
                staged = self.stager.submit(self.stage, [images[i] for i in batches[number + 1]])
            started = time.perf_counter()
            for i, detections in zip(indices, self.runner(inputs)):
                found[i] = detections
            ran.append(ModelBatch(indices, time.perf_counter() - started, batch_padding([sizes[i] for i in indices])))
        self.device_busy = self.device_busy_share(reading)
        return found, ran
