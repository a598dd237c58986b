"""The run's progress line and the taming of Ray's console output (app/progress.py, app/console.py), in-process
without Ray: a clock the tests move, rows the tests make."""

import io
import logging
import os
import subprocess
import sys
import textwrap
import time

import pyarrow as pa
import pytest
import ray

from app import console
from app.progress import Progress, duration


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def rows(count: int, errors: tuple = ()) -> pa.Table:
    kinds = list(errors) + [None] * (count - len(errors))
    return pa.table({"path": [f"{i}.jpg" for i in range(count)], "error_kind": pa.array(kinds, pa.string())})


@pytest.mark.parametrize("seconds, text", [(0, "0 s"), (35.4, "35 s"), (760, "12 min 40 s"), (11100, "3 h 05 min")])
def test_duration(seconds, text):
    assert duration(seconds) == text


def test_line_counts_rate_time_left_and_errors_by_kind():
    clock = Clock()
    progress = Progress(30, total=1000, clock=clock)
    assert progress.line() == "progress: 0 of 1,000 images (0.0%), 0.00 images/s, time left unknown, errors: 0"
    clock.now += 10
    progress.add(rows(100, errors=("unreadable", "corrupt_image", "unreadable")), {"n1/a1/cpu"})
    assert progress.line() == (
        "progress: 100 of 1,000 images (10.0%), 10.00 images/s, 1 min 30 s left, errors: 3 (corrupt_image=1, unreadable=2)"
    )
    # The rate is the last interval's: 50 images in 25 s, 850 to go.
    clock.now += 25
    progress.add(rows(50), {"n1/a1/cpu", "n1/a2/cpu"})
    assert progress.line() == (
        "progress: 150 of 1,000 images (15.0%), 2.00 images/s, 7 min 05 s left, errors: 3 (corrupt_image=1, unreadable=2)"
    )


def test_a_resumed_run_counts_the_rows_committed_before():
    clock = Clock()
    progress = Progress(30, total=1000, done_before=900, clock=clock)
    clock.now += 20
    progress.add(rows(40), set())
    assert progress.line() == "progress: 940 of 1,000 images (94.0%), 2.00 images/s, 30 s left, errors: 0"
    clock.now += 20
    progress.add(rows(60), set())
    # The final line: the whole run's rate (100 images in 40 s).
    assert progress.line(final=True) == "progress: 1,000 of 1,000 images (100.0%), 2.50 images/s, done, errors: 0"


def test_streamed_inputs_show_what_is_listed_so_far():
    clock = Clock()
    listed = [5000]
    progress = Progress(30, done_before=1000, listed_so_far=lambda: listed[0], clock=clock)
    clock.now += 10
    progress.add(rows(200, errors=("too_large",)), set())
    assert progress.line() == (
        "progress: 1,200 of at least 5,000 images (the listing goes on), 20.00 images/s, "
        "time left unknown until the listing ends, errors: 1 (too_large=1)"
    )
    progress.add(rows(100), set())
    assert progress.line(final=True) == "progress: 1,300 of 1,300 images (100.0%), 30.00 images/s, done, errors: 1 (too_large=1)"


def test_a_failed_count_of_listed_inputs_leaves_the_line_standing():
    def unreachable() -> int:
        raise ConnectionError("the tally actor is gone")

    clock = Clock()
    progress = Progress(30, listed_so_far=unreachable, clock=clock)
    clock.now += 4
    progress.add(rows(8), set())
    assert progress.line() == (
        "progress: 8 of at least 8 images (the listing goes on), 2.00 images/s, time left unknown until the listing "
        "ends, errors: 0"
    )


def test_peak_actors_are_the_most_at_work_within_one_interval_by_device():
    clock = Clock()
    progress = Progress(30, total=100, clock=clock)
    progress.add(rows(1), {"n1/a1/cuda:NVIDIA H100", "n1/a2/cuda:NVIDIA H100"})
    progress.line()
    progress.add(rows(1), {"n1/a1/cuda:NVIDIA H100", "n2/a3/cuda:NVIDIA H100", "n2/a4/cpu"})
    progress.add(rows(1), {"n2/a5/cuda:NVIDIA H100"})
    progress.line()
    progress.add(rows(1), {"n1/a1/cuda:NVIDIA H100"})
    # The live redraw does not end an interval.
    progress.line(advance=False)
    assert dict(progress.peak_actors()) == {"cuda": 3, "cpu": 1}


def test_a_warning_once_as_soon_as_too_many_images_failed(caplog):
    """With 10 rows already committed, 3 of them errors, and data.max_error_fraction=0.1 of 100 images:
    the 11th error makes the run certain to fail."""
    progress = Progress(30, total=100, done_before=10, errors_before=3, max_error_fraction=0.1, clock=Clock())
    with caplog.at_level(logging.WARNING, logger="app.progress"):
        progress.add(rows(10, errors=("unreadable",) * 7), set())
        assert caplog.records == []
        progress.add(rows(5, errors=("corrupt_image",)), set())
        progress.add(rows(5, errors=("corrupt_image",)), set())
    assert [record.getMessage() for record in caplog.records] == [
        "11 images failed so far, over data.max_error_fraction=0.1 of 100: the run will end with exit code 3 "
        "once every row is written"
    ]


def wait_until(condition, deadline_s: float = 60) -> None:
    """Polls condition until it holds; the deadline is generous, only there to fail a hung thread."""
    deadline = time.monotonic() + deadline_s
    while not condition():
        assert time.monotonic() < deadline, "the progress thread did not report in time"
        time.sleep(0.01)


def test_lines_are_logged_at_the_interval_and_at_the_end(caplog):
    """The reporting thread on a real clock, with a short interval; the output is not a terminal. The test waits
    for two interval lines (60 s at most, a generous deadline, not a timing bound), then the end adds the last."""
    out = io.StringIO()
    with caplog.at_level(logging.INFO, logger="app.progress"):
        with Progress(0.05, total=10, out=out) as progress:
            progress.add(rows(4), set())
            wait_until(lambda: len(caplog.records) >= 2)
            progress.add(rows(6, errors=("empty_file",)), set())
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) >= 3
    assert lines[0].startswith("progress: 4 of 10 images (40.0%), ")
    assert lines[-1].startswith("progress: 10 of 10 images (100.0%), ")
    assert lines[-1].endswith(", done, errors: 1 (empty_file=1)")
    assert out.getvalue() == ""  # no live redraw when the output is not a terminal


def test_on_a_terminal_the_line_is_redrawn_in_place_between_log_lines(caplog):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Terminal()
    with caplog.at_level(logging.INFO, logger="app.progress"):
        with Progress(60, total=10, out=out) as progress:
            progress.add(rows(4), set())
            wait_until(lambda: "progress: 4 of 10" in out.getvalue())  # one redraw a second
    redraws = out.getvalue().split("\r\x1b[K")
    assert redraws[0] == "" and redraws[-1] == ""  # each redraw starts by clearing the line; the last clears it
    assert redraws[1].startswith("progress: 4 of 10 images (40.0%), ")
    assert len(caplog.records) == 1  # the final line only: the interval (60 s) did not pass
    assert caplog.records[0].getMessage().startswith("progress: 4 of 10 images (40.0%), ")


def test_no_final_line_when_the_run_fails(caplog):
    with caplog.at_level(logging.INFO, logger="app.progress"):
        with pytest.raises(RuntimeError):
            with Progress(60, total=10, out=io.StringIO()):
                raise RuntimeError("the job failed")
    assert caplog.records == []


@pytest.mark.slow
def test_stderr_lines_with_a_marker_are_dropped_and_the_rest_pass_in_order():
    """Lines written to file descriptor 2 by C code (here a child process that inherits it, as Ray's core
    worker writes from C++) and by Python."""
    script = textwrap.dedent("""
        import os, sys
        from app import console
        with console.without_stderr_lines(b"max_restarts > 0", b"SECRET"):
            os.write(2, b"first line\\n[E core_worker.cc:2465] Actor has constructor arguments in the object store and max_restarts > 0.\\n")
            print("from python", file=sys.stderr)
            os.system("echo from a child >&2; echo a SECRET line >&2")
            os.write(2, b"no newline at the end")
        print("after", file=sys.stderr)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert result.returncode == 0
    assert result.stderr == "first line\nfrom python\nfrom a child\nno newline at the endafter\n"


def test_ray_auth_default_notice_is_dropped_and_other_ray_warnings_kept(caplog):
    console.quiet_local_ray_start()
    console.quiet_local_ray_start()  # once is enough: the filter is not added twice
    logger = logging.getLogger("ray._private.authentication.authentication_token_setup")
    assert sum(isinstance(f, console.RayAuthDefaultNotice) for f in logger.filters) == 1
    with caplog.at_level(logging.WARNING, logger=logger.name):
        logger.warning("Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out.")
        logger.warning("Token authentication is disabled for this Ray cluster. Anyone with network access ...")
    assert [record.getMessage() for record in caplog.records] == [
        "Token authentication is disabled for this Ray cluster. Anyone with network access ..."
    ]


def test_ray_data_informational_lines_and_bars_are_off_unless_asked(monkeypatch):
    context = ray.data.DataContext.get_current()
    monkeypatch.setattr(context, "enable_progress_bars", True)
    everything = logging.getLogger("ray.data").handlers
    handlers = [h for h in everything if type(h).__name__ == "PlainRayHandler"]  # Ray Data's console handler
    files = [h for h in everything if type(h).__name__ == "SessionFileHandler"]
    assert (len(handlers), len(files)) == (1, 1)
    monkeypatch.setattr(files[0], "level", logging.NOTSET)
    for handler in handlers:
        monkeypatch.setattr(handler, "level", logging.INFO)
    console.tame_ray_data(show=True)
    assert (context.enable_progress_bars, [h.level for h in handlers]) == (True, [logging.INFO] * len(handlers))
    console.tame_ray_data(show=False)
    assert (context.enable_progress_bars, [h.level for h in handlers]) == (False, [logging.WARNING] * len(handlers))
    assert files[0].level == logging.NOTSET  # the log file still gets everything
