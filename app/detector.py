"""The detector stage: a Ray Data class UDF that loads the model once per actor; `Detector.detect` takes
decoded pixels and returns detections (boxes in model pixels, scores, label ids). Its Ray Data call reads
the pixels of a decoded batch (app.decode.pixels) and hands the detections to app.output.rows, which
makes the result rows.

How it keeps the device busy:
- The images of a call are grouped into model batches by shape (`shape_batches`): the model pads every
  image of a batch to the batch's largest one, so a landscape and a portrait photo together cost about
  1.4x the pixels of each alone.
- A staging thread copies the next model batch's uint8 pixels to the device (on a GPU: packed into one
  pinned buffer, one non-blocking copy on a copy stream) while the device runs the current batch.
- The model takes uint8 pixels at its input size: they become floats on the device, and torchvision's
  transform does not resize them a second time (`PixelModel`).
- Detections come back to the host in three copies per model batch (`to_host`).
A CUDA out-of-memory error splits the batch in halves and retries them instead of failing the actor.
"""

import logging
import math
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, NamedTuple, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import torch
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from app import decode
from app.decode import model_input_size
from app.model import ModelSpec, build_model
from app.output.rows import result_rows

log = logging.getLogger(__name__)

AUTOCAST_DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
# A model batch may pad its images to at most this much more than the pixels they need on their own.
MAX_BATCH_PADDING = 0.2
# torchvision's detection transform pads a batch's height and width up to multiples of this.
SIZE_DIVISIBLE = 32
# A column of the detector's output beside the result rows: "<node id>/<actor id>/<device>" of the actor
# that made them. The driver counts the actors a run used, then drops it before committing the rows.
WORKER_COLUMN = "_worker"


# Begins the message of a DeviceError, so that the driver finds it inside Ray's wrapping of the actor's error.
DEVICE_ERROR_MARKER = "ray-detect device error:"
NVIDIA_DRIVER_VERSION_FILE = "/proc/driver/nvidia/version"


class DeviceError(Exception):
    """A detector actor holds a GPU that torch cannot use."""


def device_name(device: torch.device) -> str:
    """The device as the summary and the manifest name it: cuda:<GPU model>, or cpu."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return device.type


def worker_name(device: torch.device) -> str:
    """This actor's node, its id and its device, as WORKER_COLUMN holds them."""
    if not ray.is_initialized():
        return f"local/{id(device)}/{device_name(device)}"
    context = ray.get_runtime_context()
    return f"{context.get_node_id()}/{context.get_actor_id()}/{device_name(device)}"


def nvidia_driver_version() -> Optional[str]:
    """The NVIDIA kernel driver's version on this node, when one is loaded."""
    try:
        with open(NVIDIA_DRIVER_VERSION_FILE) as file:
            words = file.readline().split()
    except OSError:
        return None
    return next((word for word in words if word[:1].isdigit() and "." in word), None)


def cuda_failure() -> str:
    """Why torch cannot use CUDA here, in torch's words (its first line)."""
    try:
        torch.cuda.init()
    except Exception as error:  # torch raises RuntimeError or AssertionError, depending on the cause
        return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return "torch.cuda.is_available() is False"


def unusable_gpu_message(gpu_ids: list) -> str:
    node = ray.util.get_node_ip_address() if ray.is_initialized() else "this machine"
    driver = nvidia_driver_version()
    return (
        f"{DEVICE_ERROR_MARKER} the detector actor on node {node} holds GPU(s) {', '.join(map(str, gpu_ids))} "
        f"but torch {torch.__version__} (built for CUDA {torch.version.cuda}) cannot use them: {cuda_failure()}; "
        f"NVIDIA driver {driver or 'not found'}. Run an image whose torch build the node's driver supports "
        f"(this project's image needs driver R570 or newer), or set inference.cpu_fallback=true to run the "
        f"detector on the CPU deliberately"
    )


def choose_device(cpu_fallback: bool = False) -> torch.device:
    """CUDA when Ray gave this actor a GPU; the CPU when it gave none. An actor given a GPU that torch
    cannot use raises DeviceError, unless cpu_fallback allows the CPU (with a warning)."""
    gpu_ids = ray.get_gpu_ids() if ray.is_initialized() else []
    if not gpu_ids:
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    message = unusable_gpu_message(gpu_ids)
    if not cpu_fallback:
        raise DeviceError(message)
    log.warning("%s; running on the CPU (inference.cpu_fallback=true)", message.removeprefix(DEVICE_ERROR_MARKER).strip())
    return torch.device("cpu")


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


class PresizedTransform(GeneralizedRCNNTransform):
    """torchvision's detection transform, except that an image already at the model's input size is
    not interpolated again (an identity resize still costs milliseconds per image on a CPU)."""

    @classmethod
    def like(cls, transform: GeneralizedRCNNTransform) -> "PresizedTransform":
        presized = cls(transform.min_size, transform.max_size, transform.image_mean, transform.image_std,
                       size_divisible=transform.size_divisible, fixed_size=transform.fixed_size)
        return presized.train(transform.training)

    def resize(self, image, target=None):
        height, width = image.shape[-2:]
        at_model_size = (width, height) == model_input_size(width, height, self.min_size[-1], self.max_size)
        if at_model_size and target is None and not self.training and self.fixed_size is None:
            return image, target
        return super().resize(image, target)


class PixelModel(torch.nn.Module):
    """A torchvision detection model that takes CHW uint8 images on its device: pixels in, boxes out."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        model.transform = PresizedTransform.like(model.transform)
        self.model = model

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        # A multiplication by the reciprocal: CUDA computes a division by a scalar that way, so every
        # device turns the same pixels into the same floats.
        return self.model([image.float().mul_(1 / 255) for image in images])


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
    """HWC uint8 images as CHW uint8 tensors on device.

    On CUDA the images are packed into one pinned host buffer and copied in one non-blocking transfer
    on copy_stream. On the CPU the tensors are views of the images: nothing is copied."""
    if device.type != "cuda":
        with warnings.catch_warnings():
            # Decoded pixels are read-only views of Arrow buffers; the model only reads them.
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            return Staged([torch.from_numpy(image).permute(2, 0, 1) for image in images])
    sizes = [image.size for image in images]
    host = torch.empty(sum(sizes), dtype=torch.uint8, pin_memory=True)
    staging, offset = host.numpy(), 0
    for image, size in zip(images, sizes):
        staging[offset : offset + size] = image.reshape(-1)
        offset += size
    copy_stream = copy_stream or torch.cuda.current_stream(device)
    with torch.cuda.stream(copy_stream):
        flat = host.to(device, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record(copy_stream)
    tensors, offset = [], 0
    for image, size in zip(images, sizes):
        tensors.append(flat[offset : offset + size].view(image.shape).permute(2, 0, 1))
        offset += size
    return Staged(tensors, copied)


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
    precision "fp16" or "bf16" runs the model under autocast on the device (GPUs with tensor cores).
    batch_size is the most images per model call; a call of the actor holds several model batches,
    which are grouped by shape. An actor that holds a GPU torch cannot use raises DeviceError before any
    image, unless cpu_fallback lets it run on the CPU."""

    def __init__(self, spec: ModelSpec, num_threads: int, precision: str = "fp32", batch_size: int = 4,
                 cpu_fallback: bool = False):
        torch.set_num_threads(max(1, num_threads))
        if precision not in AUTOCAST_DTYPES:
            raise ValueError(f"precision {precision!r} is not one of {', '.join(AUTOCAST_DTYPES)}")
        self.device = choose_device(cpu_fallback)
        self.autocast_dtype = AUTOCAST_DTYPES[precision]
        self.spec, self.batch_size = spec, batch_size
        model, self.categories = self.load_model(spec)
        self.model = model.to(self.device)
        self.label_names = pa.array(self.categories, pa.string())
        self.runner = SplittingRunner(self.forward, release_cuda_memory if self.device.type == "cuda" else lambda: None)
        self.copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.stager = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stage-batch")
        self.worker = worker_name(self.device)

    def load_model(self, spec: ModelSpec) -> tuple[torch.nn.Module, list[str]]:
        """The model (CHW uint8 images in, torchvision's detections out) and its label names. The
        benchmark's device stand-in replaces this."""
        model, categories = build_model(spec)
        return PixelModel(model), categories

    def stage(self, images: list[np.ndarray]) -> Staged:
        return to_device(images, self.device, self.copy_stream)

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, np.ndarray]]:
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            outputs = self.model(images)
        return to_host(outputs)

    @torch.inference_mode()
    def detect(self, images: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
        """Run the model on HWC uint8 images; returns boxes (model pixels), scores and labels per image.
        The next model batch is staged on the device while the current one runs."""
        if not images:
            return []
        sizes = [model_input_size(image.shape[1], image.shape[0], self.spec.min_size, self.spec.max_size) for image in images]
        batches = shape_batches(sizes, self.batch_size)
        found: list[dict[str, np.ndarray]] = [{}] * len(images)
        staged = self.stager.submit(self.stage, [images[i] for i in batches[0]])
        for number, indices in enumerate(batches):
            tensors = staged.result().ready()
            if number + 1 < len(batches):
                staged = self.stager.submit(self.stage, [images[i] for i in batches[number + 1]])
            for i, detections in zip(indices, self.runner(tensors)):
                found[i] = detections
        return found

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Ray Data's call: decoded rows (app.decode.DECODED_SCHEMA) in, result rows out, one for one."""
        rows = np.flatnonzero(pc.is_null(batch.column("error_kind")).to_numpy(zero_copy_only=False))
        table = result_rows(batch, rows, self.detect(decode.pixels(batch, rows)), self.label_names)
        return table.append_column(WORKER_COLUMN, pa.array([self.worker] * table.num_rows, pa.string()))
