"""The run's own metrics, through Ray's metrics API: each process records into its node's metrics
agent, which every Ray node already exports on its metrics port (KubeRay's PodMonitor scrapes it). Ray
prefixes the names with `ray_`; counters end in `_total`.

Labels: `run` (metrics.run, one value for a run and the scheduled runs that resume it) and `model`; the
detector actors' metrics add `device` (`cpu`, or `cuda:<GPU model>`). Never a path.

The driver records what it sees in the rows it commits (outcomes, detections, bytes, and the timings that
the decode tasks and the detector actors attach to each row as MEASUREMENT_COLUMNS), so counts are exact
however workers come and go; it also refreshes the run's gauges every REFRESH_S seconds. Each detector
actor reports itself alive (`detector_actors`) from a thread of its own.
"""

import logging
import threading
import time
from typing import Callable, Optional

import pyarrow as pa
import pyarrow.compute as pc
from ray.util.metrics import Counter, Gauge, Histogram

from app.background import BackgroundLoop

log = logging.getLogger(__name__)

# Columns the stages add to each row for the driver's metrics, dropped before the rows are committed:
# who made the row, the bytes its file had, the seconds it took to read and decode, its share of its model
# batch's seconds, and (on the first image of each model batch, null on the others) the batch's images and
# padding (padded pixels over the pixels its images need, minus 1), the actor's batch size (as
# configured, or calibrated: app.calibration), and (on the first row of each call, null on the others) the
# share of the call's time its device ran kernels (app.detector.Detector.device_busy_share; null on a CPU).
WORKER_COLUMN = "_worker"  # "<node id>/<actor id>/<device>"
INPUT_BYTES_COLUMN = "_input_bytes"
DECODE_SECONDS_COLUMN = "_decode_seconds"
MODEL_SECONDS_COLUMN = "_model_seconds"
BATCH_IMAGES_COLUMN = "_batch_images"
BATCH_PADDING_COLUMN = "_batch_padding"
BATCH_SIZE_COLUMN = "_batch_size"
DEVICE_BUSY_COLUMN = "_device_busy"
MEASUREMENT_COLUMNS = (WORKER_COLUMN, INPUT_BYTES_COLUMN, DECODE_SECONDS_COLUMN, MODEL_SECONDS_COLUMN,
                       BATCH_IMAGES_COLUMN, BATCH_PADDING_COLUMN, BATCH_SIZE_COLUMN, DEVICE_BUSY_COLUMN)

# Seconds between refreshes of the gauges (Ray drops a gauge not set again within two of its export
# intervals, 10 s each by default).
REFRESH_S = 2.0
SECONDS_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
# One bucket per size up to 16, so that a batch one image short of the default batch sizes (8, 16) is told
# apart from a full one; the summary and the manifest have the exact sizes (Summary.model_batches).
BATCH_IMAGES_BUCKETS = [*range(1, 17), 24, 32, 48, 64]
PADDING_BUCKETS = [0.01, 0.05, 0.1, 0.2, 0.5, 1.0]
RUN_TAGS = ("run", "model")
OK = "ok"

# name: (type, unit, help). docs/monitoring.md's metrics table lists the same.
METRICS = {
    "detect_images": ("counter", "images", "Images this run finished, by outcome: ok, an error kind, or transient (left for a rerun)"),
    "detect_detections": ("counter", "detections", "Detections in the images this run finished"),
    "detect_input_bytes": ("counter", "bytes", "Bytes of the image files this run read"),
    "detect_read_retries": ("counter", "reads", "Reads tried again after a fault that may pass"),
    "detect_decode_seconds": ("histogram", "seconds", "Seconds to read and decode one image"),
    "detect_model_seconds": ("histogram", "seconds", "Seconds of model time per image (its model batch's time over its images)"),
    "detect_batch_images": ("histogram", "images", "Images per model batch"),
    "detect_batch_padding": ("histogram", "ratio", "Padded pixels of a model batch over the pixels its images need, minus 1"),
    "detect_actor_busy_seconds": ("counter", "seconds", "Seconds the detector actors spent in model batches, by device"),
    "detect_detector_actors": ("gauge", "actors", "Detector actors alive, by device"),
    "detect_inputs": ("gauge", "images", "Inputs of the run: all of them, or those listed so far while the listing goes on"),
    "detect_images_done": ("gauge", "images", "Inputs with a committed row, earlier runs' included"),
    "detect_images_failed": ("gauge", "images", "Committed error rows, earlier runs' included"),
    "detect_max_error_fraction": ("gauge", "ratio", "data.max_error_fraction: the run fails above this fraction of errors"),
    "detect_last_commit_timestamp_seconds": ("gauge", "seconds", "Unix time of the run's last commit (or its start)"),
    "detect_lease_heartbeats": ("counter", "heartbeats", "Renewals of the run's lease on output.path"),
}


def counter(name: str, tag_keys: tuple[str, ...] = RUN_TAGS) -> Counter:
    return Counter(name, description=METRICS[name][2], tag_keys=tag_keys)


def gauge(name: str, tag_keys: tuple[str, ...] = RUN_TAGS) -> Gauge:
    return Gauge(name, description=METRICS[name][2], tag_keys=tag_keys)


def histogram(name: str, boundaries: list[float]) -> Histogram:
    return Histogram(name, description=METRICS[name][2], boundaries=boundaries, tag_keys=RUN_TAGS)


def device_of(worker: str) -> str:
    return worker.split("/", 2)[2]


class RunMetrics:
    """The driver's metrics of one run, labelled with `tags` (RUN_TAGS). `record` takes each batch of
    rows before they are committed. The gauges, the read retries and the lease heartbeats come from
    `state`, called every REFRESH_S seconds on a thread of its own and once at the end; it returns inputs,
    done, failed, max_error_fraction, last_commit (unix time), and the read_retries and lease_heartbeats
    so far; `totals` adds those counts up across restarts of the actor that keeps them."""

    def __init__(self, tags: dict[str, str], state: Callable[[], dict[str, float]]):
        self.tags = dict(tags)
        self.state = state
        self.images = counter("detect_images", RUN_TAGS + ("outcome",))
        self.detections = counter("detect_detections")
        self.input_bytes = counter("detect_input_bytes")
        self.read_retries = counter("detect_read_retries")
        self.decode_seconds = histogram("detect_decode_seconds", SECONDS_BUCKETS)
        self.model_seconds = histogram("detect_model_seconds", SECONDS_BUCKETS)
        self.batch_images = histogram("detect_batch_images", BATCH_IMAGES_BUCKETS)
        self.batch_padding = histogram("detect_batch_padding", PADDING_BUCKETS)
        self.busy_seconds = counter("detect_actor_busy_seconds", RUN_TAGS + ("device",))
        self.lease_heartbeats = counter("detect_lease_heartbeats")
        self.gauges = {name: gauge(name) for name in ("detect_inputs", "detect_images_done", "detect_images_failed",
                                                       "detect_max_error_fraction", "detect_last_commit_timestamp_seconds")}
        self.seen = {"read_retries": 0, "lease_heartbeats": 0}  # what `state` last said of each count
        self.totals = dict(self.seen)  # each count over the whole run, across restarts of what keeps it
        self.refreshing = BackgroundLoop("run-metrics", self._refresh_until_stopped)

    def record(self, rows: pa.Table) -> None:
        """Count a batch of rows (with MEASUREMENT_COLUMNS) that the driver is about to commit or set aside."""
        kinds = rows.column("error_kind")
        ok = pc.sum(pc.is_null(kinds)).as_py() or 0
        if ok:
            self.images.inc(ok, {**self.tags, "outcome": OK})
        for kind in pc.value_counts(kinds.drop_null()).to_pylist():
            self.images.inc(kind["counts"], {**self.tags, "outcome": kind["values"]})
        self.inc(self.detections, pc.sum(rows.column("num_detections")).as_py())
        self.inc(self.input_bytes, pc.sum(rows.column(INPUT_BYTES_COLUMN)).as_py())
        for column, histogram_ in ((DECODE_SECONDS_COLUMN, self.decode_seconds), (MODEL_SECONDS_COLUMN, self.model_seconds),
                                   (BATCH_IMAGES_COLUMN, self.batch_images), (BATCH_PADDING_COLUMN, self.batch_padding)):
            values = rows.column(column)
            if pa.types.is_list(values.type):  # the model batches that began with the row's image
                values = pc.list_flatten(values)
            for value in values.drop_null().to_pylist():
                histogram_.observe(value, self.tags)
        busy = pa.table({"device": rows.column(WORKER_COLUMN), "seconds": rows.column(MODEL_SECONDS_COLUMN)})
        for group in busy.drop_null().group_by("device").aggregate([("seconds", "sum")]).to_pylist():
            self.busy_seconds.inc(group["seconds_sum"], {**self.tags, "device": device_of(group["device"])})

    def inc(self, metric: Counter, value: Optional[float]) -> None:
        if value:
            metric.inc(value, self.tags)

    def refresh(self) -> None:
        """Set the gauges, and count the retries and heartbeats since the last refresh."""
        state = self.state()
        for name in self.seen:
            # The retry budget's actor counts from 0 again when Ray restarts it: all it holds then is new.
            new = state[name] - self.seen[name] if state[name] >= self.seen[name] else state[name]
            self.inc(getattr(self, name), new)
            self.totals[name] += new
            self.seen[name] = state[name]
        values = {"detect_inputs": state["inputs"], "detect_images_done": state["done"], "detect_images_failed": state["failed"],
                  "detect_max_error_fraction": state["max_error_fraction"], "detect_last_commit_timestamp_seconds": state["last_commit"]}
        for name, value in values.items():
            self.gauges[name].set(value, self.tags)

    def refresh_or_warn(self) -> None:
        try:
            self.refresh()
        except Exception as error:  # a run's own error tells what went wrong; the metrics try again later
            log.warning("could not refresh the run's metrics: %s", error)

    def _refresh_until_stopped(self, stopping: threading.Event) -> None:
        while not stopping.wait(REFRESH_S):
            self.refresh_or_warn()

    def __enter__(self) -> "RunMetrics":
        self.refresh_or_warn()
        self.refreshing.start()
        return self

    def __exit__(self, *exc) -> None:
        self.refreshing.stop()
        self.refresh_or_warn()


class ActorAlive:
    """A detector actor's `detector_actors` gauge, set to 1 every REFRESH_S seconds on a daemon thread
    while the actor lives (Ray drops it soon after the actor is gone)."""

    def __init__(self, tags: dict[str, str], device: str):
        self.gauge = gauge("detect_detector_actors", RUN_TAGS + ("device",))
        self.tags = {**tags, "device": device}
        threading.Thread(target=self._beat, name="actor-alive", daemon=True).start()

    def _beat(self) -> None:
        while True:
            self.gauge.set(1, self.tags)
            time.sleep(REFRESH_S)
