"""The detector stage as the driver sees it: the class Ray Data builds in each actor of the pool, and the
marker of the actors' device errors. Nothing here imports torch: the detector (app.detector, torch and
torchvision) is imported in the actors, so that the driver of a run with a checkpoint or random weights
starts about 3 s sooner and stays about 600 MB smaller (app.model says when it does load them).
"""

from typing import Optional

import pyarrow as pa

# Begins the message of a DeviceError (app.device), so that the driver finds it inside Ray's wrapping of
# the actor's error.
DEVICE_ERROR_MARKER = "ray-detect device error:"


class DetectorStage:
    """Ray Data's class UDF of the detector stage: each actor builds `detector` (app.detector.Detector,
    or the benchmark's stand-in) with `options`, and hands it every batch."""

    def __init__(self, detector: Optional[type] = None, **options):
        if detector is None:
            from app.detector import Detector as detector
        self.detector = detector(**options)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return self.detector(batch)
