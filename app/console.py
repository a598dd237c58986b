"""What the job's console shows of Ray: its start-up lines and its real problems, not the noise of choices
the app made on purpose. The app's own progress is app/progress.py."""

import contextlib
import logging
import os
import sys
import threading
from typing import Iterator

import ray
from ray.util.debug import log_once

# A line Ray's core worker logs at error level, in C++ (so no Python filter reaches it), for every Ray
# Data actor pool: Ray Data passes its actors their constructor arguments through the object store while
# it lets them restart. It is Ray Data's own doing, not a problem of the run (ray-project/ray#57733).
RAY_DATA_ACTOR_ARGUMENTS_LINE = b"has constructor arguments in the object store and max_restarts > 0"
# Seconds to wait for the last filtered lines to be forwarded.
JOIN_TIMEOUT_S = 2.0


def tame_ray_data(show: bool) -> None:
    """Unless `show` (progress.ray_data), Ray Data's progress bars are off and its informational lines
    (execution plan, start and end of a dataset) go to its log file only; its warnings still show."""
    if show:
        return
    # Ray Data warns once that its bars are off: they are off on purpose.
    log_once("ray_data_progress_manager_disabled")
    ray.data.DataContext.get_current().enable_progress_bars = False
    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.WARNING)


class RayAuthDefaultNotice(logging.Filter):
    """Drops Ray's notice that a local Ray instance it starts uses token authentication by default: the
    app keeps that default on purpose (its local instance is for one user), so the notice is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Token authentication is enabled for this Ray cluster.")


def quiet_local_ray_start() -> None:
    """Before the app starts a local Ray instance: leave out Ray's notices about defaults the app keeps."""
    logger = logging.getLogger("ray._private.authentication.authentication_token_setup")
    if not any(isinstance(existing, RayAuthDefaultNotice) for existing in logger.filters):
        logger.addFilter(RayAuthDefaultNotice())


@contextlib.contextmanager
def without_stderr_lines(*markers: bytes) -> Iterator[None]:
    """Drop the lines of this process's standard error (file descriptor 2, where Ray's C++ code writes
    too) that hold one of `markers`; every other line passes unchanged, in order."""
    sys.stderr.flush()
    real_stderr = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def forward() -> None:
        with os.fdopen(read_end, "rb", buffering=0) as pipe:
            pending = b""
            while chunk := pipe.read(65536):
                lines = (pending + chunk).split(b"\n")
                pending = lines.pop()
                kept = [line + b"\n" for line in lines if not any(marker in line for marker in markers)]
                if kept:
                    os.write(real_stderr, b"".join(kept))
            if pending and not any(marker in pending for marker in markers):
                os.write(real_stderr, pending)

    thread = threading.Thread(target=forward, name="stderr-filter", daemon=True)
    thread.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        # Closes this process's write end of the pipe; the thread forwards what is left and ends, unless
        # a child process still holds the pipe, for which it goes on (and its copy of stderr stays open).
        os.dup2(real_stderr, 2)
        thread.join(timeout=JOIN_TIMEOUT_S)
        if not thread.is_alive():
            os.close(real_stderr)
