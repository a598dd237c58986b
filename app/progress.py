"""The run's progress, as its user reads it in the log: images done of the total, the rate over the last
interval, the time left, and the errors so far by kind.

A line is logged every progress.interval_s seconds (and when the run ends); on a terminal the same line is
also redrawn in place every second. Rows committed by an earlier run count as done, so that a resumed
run's percentage and time left are those of the whole dataset. When Ray tasks list the inputs as the run
goes (large trees, manifests), the total is what they have listed so far ("of at least N") until the
run ends, and no time left is given.
"""

import logging
import sys
import threading
import time
from collections import Counter
from typing import Callable, Optional, TextIO

import pyarrow as pa
import pyarrow.compute as pc

from app.background import BackgroundLoop

log = logging.getLogger(__name__)

# Seconds between redraws of the live line on a terminal.
LIVE_INTERVAL_S = 1.0


def duration(seconds: float) -> str:
    """3 h 05 min, 12 min 40 s, 35 s."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    if minutes:
        return f"{minutes} min {seconds:02d} s"
    return f"{seconds} s"


class Progress:
    """Counts result rows as the driver commits them and reports them on a background thread.

    `total` is the number of inputs when it is known before the run; otherwise `listed_so_far` tells how
    many the listing has found yet. `done_before` counts the rows earlier runs committed, `errors_before`
    the error rows among them. Once more images failed than data.max_error_fraction of the total allows,
    a warning says so (once): the run is bound to fail, though it still writes every row."""

    def __init__(self, interval_s: float, total: Optional[int] = None, done_before: int = 0,
                 listed_so_far: Optional[Callable[[], int]] = None, max_error_fraction: float = 1.0,
                 errors_before: int = 0, out: TextIO = sys.stdout, clock: Callable[[], float] = time.monotonic):
        self.interval_s, self.total, self.done_before = interval_s, total, done_before
        self.max_error_fraction, self.errors_before = max_error_fraction, errors_before
        self.warned_errors = False
        self.listed_so_far, self.out, self.clock = listed_so_far, out, clock
        self.done = 0  # rows committed by this run
        self.errors: Counter[str] = Counter()
        # Detector actors that made rows in the current interval, and the most seen in one interval.
        self.workers_now: set[str] = set()
        self.peak_workers: set[str] = set()
        self.lock = threading.Lock()
        self.started = self.last_time = clock()
        self.last_done = 0
        self.live = out.isatty()
        self.reporting = BackgroundLoop("progress", self._report)

    def add(self, rows: pa.Table, workers: set[str]) -> None:
        kinds = pc.value_counts(rows.column("error_kind").drop_null()).to_pylist()
        with self.lock:
            self.done += rows.num_rows
            self.errors.update({kind["values"]: kind["counts"] for kind in kinds})
            self.workers_now |= workers
            failed = self.errors_before + sum(self.errors.values())
            doomed = self.total is not None and failed > self.max_error_fraction * self.total and not self.warned_errors
            self.warned_errors |= doomed
        if doomed:
            log.warning("%d images failed so far, over data.max_error_fraction=%g of %d: the run will end with exit "
                        "code 3 once every row is written", failed, self.max_error_fraction, self.total)

    def line(self, final: bool = False, advance: bool = True) -> str:
        """The progress line; with `advance`, the end of an interval (the live redraw does not advance)."""
        now = self.clock()
        with self.lock:
            done, errors = self.done_before + self.done, dict(sorted(self.errors.items()))
            since, before = (self.started, 0) if final else (self.last_time, self.last_done)
            rate = (self.done - before) / (now - since) if now > since else 0.0  # the final line: the run's rate
            if advance:
                self.last_time, self.last_done = now, self.done
                if len(self.workers_now) > len(self.peak_workers):
                    self.peak_workers = self.workers_now
                self.workers_now = set()
        total = self.total
        if total is None and final:
            total = done
        if total is not None:
            percent = 100.0 * done / total if total else 100.0
            count = f"{done:,} of {total:,} images ({percent:.1f}%)"
            left = (total - done) / rate if rate > 0 else None
            eta = "done" if done >= total else (f"{duration(left)} left" if left is not None else "time left unknown")
        else:
            count = f"{done:,} of at least {self.listed(done):,} images (the listing goes on)"
            eta = "time left unknown until the listing ends"
        failed = sum(errors.values())
        kinds = " (" + ", ".join(f"{kind}={n:,}" for kind, n in errors.items()) + ")" if failed else ""
        return f"progress: {count}, {rate:.2f} images/s, {eta}, errors: {failed:,}{kinds}"

    def counts(self) -> tuple[int, int, int]:
        """Inputs (all of them, or those listed so far), those with a committed row and the errors among
        them, earlier runs' rows included."""
        with self.lock:
            done, failed = self.done_before + self.done, self.errors_before + sum(self.errors.values())
        return (self.total if self.total is not None else self.listed(done)), done, failed

    def listed(self, done: int) -> int:
        """Inputs listed so far (at least those done), while the listing goes on."""
        try:
            listed = self.listed_so_far() if self.listed_so_far else done
        except Exception:  # the count is asked of a Ray actor; should that fail, the job's own error tells
            listed = done
        return max(listed, done)

    def peak_actors(self) -> Counter[str]:
        """The most detector actors that made rows within one interval, by device kind (cpu, cuda)."""
        with self.lock:
            peak = self.peak_workers if len(self.peak_workers) >= len(self.workers_now) else self.workers_now
            return Counter(worker.rsplit("/", 1)[-1].split(":", 1)[0] for worker in peak)

    def _report(self, stopping: threading.Event) -> None:
        next_line = self.clock() + self.interval_s
        while not stopping.wait(LIVE_INTERVAL_S if self.live else max(0.0, next_line - self.clock())):
            if self.clock() >= next_line:
                next_line += self.interval_s
                self._clear_live()
                log.info(self.line())
            elif self.live:
                self.out.write("\r\x1b[K" + self.line(advance=False))
                self.out.flush()

    def _clear_live(self) -> None:
        if self.live:
            self.out.write("\r\x1b[K")
            self.out.flush()

    def __enter__(self) -> "Progress":
        self.reporting.start()
        return self

    def __exit__(self, *exc) -> None:
        self.reporting.stop()
        self._clear_live()
        if exc[0] is None:
            log.info(self.line(final=True))
