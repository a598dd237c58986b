"""Committing a run's result rows as they stream in, and how a run stops: what it did (Executed), the
errors that stop it and say why in the command line's terms, and SIGTERM made one of them. The rows that
are verdicts on their inputs are app.output.verdicts' to decide; what it stands on, app.output.writer's."""

import contextlib
import signal
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Optional

import pyarrow as pa
import pyarrow.compute as pc
import ray

from app.config import ConfigError
from app.device import DEVICE_ERROR_MARKER
from app.metrics import BATCH_IMAGES_COLUMN, BATCH_SIZE_COLUMN, DEVICE_BUSY_COLUMN, MEASUREMENT_COLUMNS, MODEL_SECONDS_COLUMN, WORKER_COLUMN, RunMetrics
from app.model import WEIGHTS_ERROR_MARKER
from app.output.lease import OutputLease
from app.output.verdicts import Verdicts, storage_refusal
from app.plan import Plan
from app.progress import Progress
from app.retry import BUDGET_SPENT_MARKER
from app.video import VIDEO_CHANGED_MARKER

if TYPE_CHECKING:
    from app.summary import Summary


class DeviceUnavailable(Exception):
    """A detector actor holds a GPU that torch cannot use (and inference.cpu_fallback is off); the
    message is one line, from the actor."""


class InputsLeft(Exception):
    """Some inputs were not read because storage kept failing for reasons that may pass: after their
    retries (data.read_attempts), or once the run's retries were spent (data.read_retry_budget). Their rows
    are not committed, so a rerun reads them; raised after every other row is written."""

    def __init__(self, message: str, summary: Optional["Summary"] = None):
        super().__init__(message)
        self.summary = summary


def marked_error_in(error: BaseException, marker: str) -> Optional[str]:
    """The message after `marker` inside an error Ray raised on the driver, if there is one."""
    for line in str(error).splitlines():
        if marker in line:
            return line[line.index(marker) + len(marker):].strip()
    return None


class Stopped(BaseException):
    """The driver was told to stop (SIGTERM: Kubernetes stopping the pod, `ray job stop`, a deadline); the
    rows finished before are committed, and the lease released. A BaseException, like KeyboardInterrupt,
    so that no library's `except Exception` around the line it interrupts swallows it."""


@contextlib.contextmanager
def stop_on_sigterm():
    """While the context lasts, SIGTERM raises Stopped in the main thread (once: a second one while the
    run commits and releases its lease is ignored). Ray's driver exits at once on SIGTERM, before this."""

    def stop(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Stopped("SIGTERM received: the rows finished before it are committed; rerun to go on")

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@dataclass
class Executed:
    """What the execution of a run did: the images it processed, the detector actors that made rows (by
    WORKER_COLUMN), the GPUs each held, the model batches they ran (by their images, BATCH_IMAGES_COLUMN)
    against the batch size they ran at and their seconds, the tally of streamed inputs, the most actors at work at once and
    each stage's seconds of work per worker (see Summary)."""

    processed: int = 0
    # The inputs without a row because storage kept failing (verdicts.TRANSIENT_SCHEMA), and the rows dropped
    # because their path already had one from this run.
    left: Optional[pa.Table] = None
    duplicates: int = 0
    read_retries: int = 0
    workers: set[str] = field(default_factory=set)
    gpus_per_actor: float = 0.0
    batch_size: int = 0  # the largest of the detector actors' batch sizes (configured, or calibrated)
    model_batches: Counter = field(default_factory=Counter)
    model_seconds: float = 0.0  # the actors' seconds in model calls (MODEL_SECONDS_COLUMN summed)
    device_busy: list[float] = field(default_factory=list)  # each call's device busy share, where known
    tally: Optional[ray.actor.ActorHandle] = None
    peak_actors: dict[str, int] = field(default_factory=dict)
    stage_seconds: dict[str, float] = field(default_factory=dict)

    def inputs_seen(self) -> int:
        return ray.get(self.tally.total.remote())


def commit(detected: ray.data.Dataset, verdicts: Verdicts, lease: OutputLease, plan: Plan, progress: Progress,
           on_rows: Optional[Callable[[pa.Table], None]], metrics: RunMetrics) -> Executed:
    """Commit the result rows as they stream in. The driver is the only writer: rows are committed
    exactly once even when Ray retries tasks or restarts actors on other nodes; which rows are verdicts on
    their inputs, and which faults stop the run instead, app.output.verdicts decides. Each batch of rows
    is counted in the run's metrics, then loses its measurement columns. How the run stops decides what is
    still written (`stopped`)."""
    executed = Executed(gpus_per_actor=plan.resources.num_gpus)

    def committed(rows: Optional[pa.Table], workers: set[str]) -> None:
        if rows is None or not rows.num_rows:
            return
        executed.processed += rows.num_rows
        progress.add(rows, workers)
        if on_rows is not None:
            on_rows(rows)

    try:
        for rows in detected.iter_batches(batch_format="pyarrow", batch_size=None):
            workers = set(pc.unique(rows.column(WORKER_COLUMN)).to_pylist())
            executed.workers |= workers
            lease.check()
            metrics.record(rows)
            executed.model_batches.update(pc.list_flatten(rows.column(BATCH_IMAGES_COLUMN)).drop_null().to_pylist())
            executed.model_seconds += pc.sum(rows.column(MODEL_SECONDS_COLUMN)).as_py() or 0.0
            executed.batch_size = max(executed.batch_size, pc.max(rows.column(BATCH_SIZE_COLUMN)).as_py() or 0)
            executed.device_busy += rows.column(DEVICE_BUSY_COLUMN).drop_null().to_pylist()
            committed(verdicts.add(rows.drop_columns(list(MEASUREMENT_COLUMNS))), workers)
        committed(verdicts.finish(), set())
        verdicts.close()
    except BaseException as error:
        reason = stopped(error, verdicts)
        if reason is error:
            raise
        raise reason from None
    executed.left, executed.duplicates = verdicts.left(), verdicts.duplicates
    return executed


def stopped(error: BaseException, verdicts: Verdicts) -> BaseException:
    """The error that stops the run, in the command line's terms. On SIGTERM and a spent retry budget the
    rows decided so far are committed and the list of inputs left unread recorded first; when storage
    refuses the run both are tried (what fails is the rerun's); on anything else (a lease taken over, a
    full disk, a device error, a checkpoint whose bytes changed) nothing more is written."""
    reason = marked_error_in(error, DEVICE_ERROR_MARKER) if isinstance(error, Exception) else None
    if reason is not None:
        return DeviceUnavailable(reason)
    for marker in (WEIGHTS_ERROR_MARKER, VIDEO_CHANGED_MARKER):
        reason = marked_error_in(error, marker) if isinstance(error, Exception) else None
        if reason is not None:
            return ConfigError(reason)
    refusal = storage_refusal(error)
    if refusal is not None:
        with contextlib.suppress(Exception):  # storage may refuse these writes too: the rerun redoes them
            verdicts.close()
        return refusal
    if isinstance(error, Exception):
        reason = marked_error_in(error, BUDGET_SPENT_MARKER)
        if reason is None:
            return error
        error = InputsLeft(reason)
    verdicts.close()  # the rows made so far are committed: a rerun goes on from there
    return error
