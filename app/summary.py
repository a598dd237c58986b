"""What a run did (`Summary`): the job's result, printed by the command line and written into the
dataset's manifest. Its own module, so that both import it without importing each other."""

from dataclasses import dataclass, field
from typing import Optional

# A GPU busy for less than this share of the detector's model calls is waiting for the host (Python launching
# kernels, loops over images): a second actor per GPU gives it work in that time (docs/performance.md).
HOST_BOUND_BELOW = 0.7


@dataclass
class Summary:
    """What a run did; also the counts in the manifest."""

    output_path: str  # where the rows are: the Parquet dataset's URI, or a table's name
    inputs: int
    processed: int  # images that went through the model in this run (the rest were already committed)
    ok: int
    errors: int
    detections: int
    errors_by_kind: dict[str, int] = field(default_factory=dict)
    # Reads this run tried again after a fault that may pass, and inputs left unread after theirs
    # (not committed: a rerun reads them; listed in _transient.parquet).
    read_retries: int = 0
    transient: int = 0
    # Input rows this run dropped because their path was listed before (a manifest naming it twice).
    duplicates: int = 0
    wall_seconds: float = 0.0
    images_per_second: float = 0.0
    weights: str = ""
    manifest_path: str = ""  # the manifest's URI; "" for output_path/_manifest.json
    warnings: list[str] = field(default_factory=list)
    # The detector actors this run used, the nodes they ran on, the GPUs they held, and their devices
    # (cuda:<GPU model> or cpu: actors).
    detector_actors: int = 0
    detector_nodes: int = 0
    detector_gpus: float = 0.0
    detector_devices: dict[str, int] = field(default_factory=dict)
    # The most detector actors that made rows within one progress interval, by device kind (cpu, cuda).
    peak_actors: dict[str, int] = field(default_factory=dict)
    # Seconds of work per worker (task slot or actor) of each stage, by its function's name; the stage
    # with the most is the slowest, the one that sets the run's pace.
    stage_seconds: dict[str, float] = field(default_factory=dict)
    # The images per model batch of the run's detector actors (inference.batch_size, the model's default, or
    # with inference.calibrate_batch_size the largest the actors chose; 0 when no actor made rows), and the
    # model batches its detector actors ran, by their images (tiles too, with tiling), smallest first:
    # shape batching leaves a batch short of batch_size when a call holds too few images of its shape.
    batch_size: int = 0
    model_batches: dict[int, int] = field(default_factory=dict)
    # Seconds the detector actors spent in model calls (on a GPU: its work, and the host's launching it).
    model_seconds: float = 0.0
    # The share of time the detector actors' GPUs ran kernels in their model calls, as sampled: NVML's
    # utilisation read at the end of each call (its last 1/6 s to 1 s), averaged over the calls; None on CPUs.
    # Below HOST_BOUND_BELOW the run looks host-bound.
    device_busy_share: Optional[float] = None
    # Images per second per GPU the detector actors held, and, with inference.gpu_hour_price, what a
    # million images cost: those GPUs for the run's wall time. None without GPUs (or a price).
    images_per_gpu_second: Optional[float] = None
    cost_per_million_images: Optional[float] = None

    @property
    def slowest_stage(self) -> Optional[str]:
        return max(self.stage_seconds, key=self.stage_seconds.get) if self.stage_seconds else None

    def model_batches_line(self) -> Optional[str]:
        """The model batches in a line of the printed summary: how many, their mean against the batch size,
        and how many of each size, largest first. None when the run ran none."""
        if not self.model_batches:
            return None
        sizes = ", ".join(f"{size} x{count}" for size, count in sorted(self.model_batches.items(), reverse=True))
        return (f"model batches: {sum(self.model_batches.values())}, {self.mean_model_batch:.2f} images on average of "
                f"batch size {self.batch_size} ({self.mean_model_batch / self.batch_size:.0%}); by images: {sizes}")

    @property
    def model_busy_share(self) -> Optional[float]:
        """The share of the detector actors' time in the run (its wall time, each actor's) spent in model
        calls; None when no actor made rows. Well below 1 on a GPU: the actors wait for their inputs (more
        decode CPUs), or for their GPU's other actors."""
        if not self.detector_actors or not self.wall_seconds:
            return None
        return min(1.0, self.model_seconds / (self.wall_seconds * self.detector_actors))

    def cost_line(self) -> Optional[str]:
        """The detector's use of its devices in a line of the printed summary; None when no actor made rows."""
        share = self.model_busy_share
        if share is None:
            return None
        parts = [f"model calls took {share:.0%} of the detector actors' time"]
        if self.device_busy_share is not None:
            parts.append(f"their GPUs were busy {self.device_busy_share:.0%} of the model calls' time")
        if self.images_per_gpu_second is not None:
            parts.append(f"{self.images_per_gpu_second:.2f} images/s per GPU")
        if self.cost_per_million_images is not None:
            parts.append(f"{self.cost_per_million_images:.2f} per million images (inference.gpu_hour_price)")
        return "; ".join(parts)

    def host_bound_line(self) -> Optional[str]:
        """A line of the printed summary when the detector looks host-bound; None otherwise."""
        if self.device_busy_share is None or self.device_busy_share >= HOST_BOUND_BELOW:
            return None
        return (f"the detector looks host-bound: its GPUs ran kernels {self.device_busy_share:.0%} of its model calls' time; "
                f"more detector actors per GPU (inference.actors_per_gpu) may give a GPU another actor's work in that time")

    @property
    def mean_model_batch(self) -> float:
        """Images per model batch on average, over this run's model batches (0 when it ran none)."""
        batches = sum(self.model_batches.values())
        return sum(size * count for size, count in self.model_batches.items()) / batches if batches else 0.0
