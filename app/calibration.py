"""Batch-size calibration (inference.calibrate_batch_size): at a detector actor's start, a few timed model
calls on the largest padded input pick the batch size, and a cache keeps the choice for later runs.

`choose_batch_size` tries batch sizes 1, 2, 4, ... up to a ceiling (inference.batch_size, or the model's
default times CEILING_FACTOR) and stops at the first that runs out of device memory, whose peak memory
leaves less than MEMORY_MARGIN of the actor's share of the GPU, or that is slower per image than a
smaller one by more than TOLERANCE (the device is saturated). Of those that fit, it takes the smallest
whose time per image is within TOLERANCE of the best: a larger batch that gains less than that only adds
padding and part-full batches. The detector (app.detector.Detector.time_batch) measures; this module
decides and remembers, so that its logic is tested with any measuring function.

The cache is one JSON file (a path or URI, inference.calibration_cache) keyed by what the time depends
on: the device, the model and its input size, the precision, torch's version, the actor's share of the
GPU and the ceiling. On Kubernetes, where a GPU pod starts empty, put it on shared storage (the output
bucket) so that later pods reuse it. A cache that cannot be read or written is warned about and ignored:
the run goes on with the batch size it measured.
"""

import json
import logging
import math
import os
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import pyarrow.fs as pafs

from app import storage

log = logging.getLogger(__name__)

# The ceiling when inference.batch_size is null: the model's default batch size on the device, times this.
CEILING_FACTOR = 4
# A batch size is as good as the best when its time per image is within this share of the best's.
TOLERANCE = 0.05
# A batch size fits when its peak device memory leaves this share of the actor's memory free.
MEMORY_MARGIN = 0.15
# Model calls per batch size: one to warm up (lazy module loading, cuDNN's plans), then the timed ones.
TIMED_CALLS = 3
DEFAULT_CACHE = "~/.cache/ray-detect/batch-sizes.json"


@dataclass(frozen=True)
class Trial:
    """One batch size, measured: its seconds per image (inf when it ran out of device memory) and its peak
    device memory in bytes (None on a CPU)."""

    batch_size: int
    seconds_per_image: float
    peak_bytes: Optional[int] = None

    def fits(self, memory_limit: Optional[int]) -> bool:
        if math.isinf(self.seconds_per_image):
            return False
        return memory_limit is None or self.peak_bytes is None or self.peak_bytes <= (1 - MEMORY_MARGIN) * memory_limit


@dataclass(frozen=True)
class CalibrationOptions:
    """What a detector actor needs to calibrate: the largest batch size to try and where the cache is."""

    ceiling: int
    cache: str = DEFAULT_CACHE


def candidates(ceiling: int) -> list[int]:
    """Batch sizes to try: powers of two below the ceiling, then the ceiling."""
    sizes = [2**k for k in range(max(1, ceiling).bit_length()) if 2**k < ceiling]
    return sizes + [max(1, ceiling)]


def choose_batch_size(measure: Callable[[int], Trial], ceiling: int,
                      memory_limit: Optional[int] = None) -> tuple[int, list[Trial]]:
    """The batch size to run at, and the trials that chose it. `measure` times one batch size; memory_limit
    is the device memory the actor may use (None: not limited, as on a CPU)."""
    trials = []
    for size in candidates(ceiling):
        trial = measure(size)
        trials.append(trial)
        if not trial.fits(memory_limit):
            break
        if trial.seconds_per_image > (1 + TOLERANCE) * min(earlier.seconds_per_image for earlier in trials):
            break  # past the device's saturation: larger batches only cost more
    fitting = [trial for trial in trials if trial.fits(memory_limit)]
    if not fitting:
        return 1, trials
    best = min(trial.seconds_per_image for trial in fitting)
    return min(trial.batch_size for trial in fitting if trial.seconds_per_image <= best * (1 + TOLERANCE)), trials


def trials_line(trials: list[Trial]) -> str:
    """The trials in words: "1: 41.2 ms/image, 2: 30.1 ms/image, 4: out of memory"."""
    return ", ".join(f"{trial.batch_size}: out of memory" if math.isinf(trial.seconds_per_image)
                     else f"{trial.batch_size}: {1000 * trial.seconds_per_image:.1f} ms/image" for trial in trials)


class CalibrationCache:
    """The batch sizes chosen before, in a JSON file at a path or URI: {key: {"batch_size": n, "trials": [...]}}."""

    def __init__(self, uri: str):
        self.uri = uri
        self.location = storage.resolve(os.path.expanduser(uri) if "://" not in uri else uri)

    def read(self) -> dict:
        try:
            with self.location.filesystem.open_input_stream(self.location.path) as stream:
                entries = json.loads(stream.read())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as error:
            log.warning("the batch-size calibration cache %s cannot be read (%s); calibrating again", self.uri, error)
            return {}
        return entries if isinstance(entries, dict) else {}

    def get(self, key: str) -> Optional[int]:
        entry = self.read().get(key)
        size = entry.get("batch_size") if isinstance(entry, dict) else None
        return size if isinstance(size, int) and size >= 1 else None

    def put(self, key: str, batch_size: int, trials: list[Trial]) -> None:
        """Adds an entry; the actors that calibrate at once may each rewrite the file, the last one's
        entries winning (an entry lost that way is measured again by a later actor)."""
        entries = self.read()
        entries[key] = {"batch_size": batch_size,
                        "trials": [{**asdict(trial), "seconds_per_image": None if math.isinf(trial.seconds_per_image)
                                    else trial.seconds_per_image} for trial in trials]}
        try:
            parent = self.location.path.rsplit("/", 1)[0]
            if isinstance(self.location.filesystem, pafs.LocalFileSystem):
                self.location.filesystem.create_dir(parent, recursive=True)
            with self.location.filesystem.open_output_stream(self.location.path) as stream:
                stream.write(json.dumps(entries, indent=1, sort_keys=True).encode())
        except OSError as error:
            log.warning("the batch-size calibration cache %s cannot be written (%s); later actors calibrate again",
                        self.uri, error)


def calibrated_batch_size(measure: Callable[[int], Trial], options: CalibrationOptions, key: str,
                          memory_limit: Optional[int]) -> int:
    """The cached batch size for `key`, or one chosen now by measuring and then cached; logged either way."""
    cache = CalibrationCache(options.cache)
    cached = cache.get(key)
    if cached is not None:
        log.info("batch size %d, as calibrated before for %s (cache %s)", cached, key, options.cache)
        return cached
    chosen, trials = choose_batch_size(measure, options.ceiling, memory_limit)
    log.info("batch size %d, calibrated for %s: %s", chosen, key, trials_line(trials))
    cache.put(key, chosen, trials)
    return chosen
