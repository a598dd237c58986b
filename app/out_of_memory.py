"""Running out of device memory without failing the actor: `SplittingRunner` splits a list of inputs in
halves when the model runs out of memory, and caps later calls until calls fit again; `is_out_of_memory`
tells such errors from others. Used by app.detector.Detector.
"""

import logging
from typing import Callable, Optional

import torch

log = logging.getLogger(__name__)


# Out-of-memory errors that are not torch.cuda.OutOfMemoryError, by their text: a CUDA allocation outside
# torch's caching allocator (a pinned host buffer, a library's handle), and cuBLAS or cuDNN failing to
# allocate their workspace (cuDNN 9 names it ..._ALLOCATION_FAILED, older ones ..._ALLOC_FAILED).
OUT_OF_MEMORY_TEXTS = ("CUDA out of memory", "CUDA error: out of memory", "CUBLAS_STATUS_ALLOC_FAILED",
                       "CUDNN_STATUS_ALLOC_FAILED", "CUDNN_STATUS_INTERNAL_ERROR_HOST_ALLOCATION_FAILED",
                       "CUDNN_STATUS_INTERNAL_ERROR_DEVICE_ALLOCATION_FAILED")
# After an out-of-memory error caps the model batch, this many model calls in a row that fit double the cap.
CALLS_BEFORE_RAISING_THE_CAP = 16


def is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and any(text in str(error) for text in OUT_OF_MEMORY_TEXTS)


class SplittingRunner:
    """Calls `model` on a list of inputs; when it runs out of device memory, splits the list in halves
    and runs each half, down to single inputs. After an out-of-memory error on n inputs, later calls
    take at most n // 2 at a time, so one tight batch does not cost an error on every batch after it.
    The cap is not for ever: after CALLS_BEFORE_RAISING_THE_CAP model calls in a row that fit, it doubles
    (and is lifted once it reaches the largest list seen); a raised cap that runs out of memory again
    doubles the number of calls the next raise waits for, so a cap at the edge is tried ever more rarely.
    A single input that still runs out of memory after the cache is released and it is tried once more
    raises: nothing smaller can be tried."""

    def __init__(self, model: Callable[[list], list], release_memory: Callable[[], None] = lambda: None):
        self.model = model
        self.release_memory = release_memory
        self.limit: Optional[int] = None  # most inputs per model call, set by an out-of-memory error
        self.splits = 0
        self.largest = 0  # the most inputs one call of the runner was given
        self.patience = CALLS_BEFORE_RAISING_THE_CAP  # model calls that must fit before the cap doubles
        self.fitted = 0  # model calls that fitted since the last out-of-memory error or raise
        self.raised = False  # whether the cap was raised since the last out-of-memory error

    def __call__(self, inputs: list) -> list:
        self.largest = max(self.largest, len(inputs))
        results = []
        start = 0
        while start < len(inputs):
            step = self.limit or len(inputs)
            results.extend(self.run(inputs[start : start + step]))
            start += step
        return results

    def run(self, inputs: list, retried: bool = False) -> list:
        try:
            results = self.model(inputs)
        except Exception as error:
            if not is_out_of_memory(error) or (len(inputs) == 1 and retried):
                raise
            # Handled below, outside the except block: the error's traceback holds the failed call's tensors.
            failed = str(error)
        else:
            self.fit()
            return results
        self.release_memory()
        self.fitted = 0
        if self.raised:
            self.patience, self.raised = self.patience * 2, False
        if len(inputs) == 1:
            log.warning("out of device memory on a single image; retrying it once: %s", failed)
            return self.run(inputs, retried=True)
        self.splits += 1
        half = len(inputs) // 2
        self.limit = half if self.limit is None else min(self.limit, half)
        log.warning("out of device memory on a batch of %d images; splitting it in halves: %s", len(inputs), failed)
        return self.run(inputs[:half]) + self.run(inputs[half:])

    def fit(self) -> None:
        """A model call fitted: count it towards raising the cap."""
        if self.limit is None:
            return
        self.fitted += 1
        if self.fitted < self.patience:
            return
        self.limit, self.fitted, self.raised = self.limit * 2, 0, True
        if self.limit >= self.largest:
            self.limit = None
        log.info("%d model calls in a row fitted in device memory; model batches now take %s images", self.patience,
                 f"at most {self.limit}" if self.limit else "any number of")


def release_cuda_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
