"""Faults that may pass: which storage errors are worth trying again, and the trying again.

A read that fails for a reason that may pass (S3 throttling and 5xx answers, timeouts, reset or refused
connections, a node-local I/O hiccup) is retried with exponential backoff and full jitter, as the AWS SDKs
do: the n-th retry waits a random time between 0 and min(cap, base x 2^n). Anything else (not found,
permission denied, a directory, bad bytes) is the input's own fault and is not retried.

Two budgets bound the retrying: attempts per file (data.read_attempts), and retries per run
(data.read_retry_budget), kept by one actor that every decode task asks before it retries. A file that
still fails after its attempts is never a verdict on the image: it leaves the decode stage as a row of
kind TRANSIENT, which the driver does not commit (app.pipeline), so a rerun reads it again. A run whose
retry budget is spent stops with RetryBudgetSpent: storage is failing for everyone, and a rerun later
goes on where it stopped.
"""

import errno
import random
import re
import time
from typing import Callable, Optional, TypeVar

import ray

# Begins the message of RetryBudgetSpent, so that the driver finds it inside Ray's wrapping of a task's error.
BUDGET_SPENT_MARKER = "ray-detect retry budget spent:"
BACKOFF_BASE_S = 0.2
BACKOFF_CAP_S = 10.0
# OS errors that may pass: I/O errors, timeouts, network trouble, a stale NFS handle, a busy resource.
TRANSIENT_ERRNOS = {
    errno.EIO, errno.EAGAIN, errno.EINTR, errno.EBUSY, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNABORTED,
    errno.ECONNREFUSED, errno.ENETDOWN, errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ESTALE,
}
# What pyarrow's S3 errors say when the AWS SDK would retry them: an HTTP status of 429 or 5xx, the SDK's
# names for throttling, service and network failures, curl's errors (resets, empty replies, timeouts).
TRANSIENT_TEXT = re.compile(
    r"HTTP status (429|5\d\d)|SLOW_DOWN|SlowDown|THROTTLING|Throttl|SERVICE_UNAVAILABLE|INTERNAL_FAILURE|"
    r"REQUEST_TIMEOUT|RequestTimeout|NETWORK_CONNECTION|curlCode|Timeout was reached|Connection reset"
)
# Errors about the input itself, whatever their text says.
PERMANENT_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)

T = TypeVar("T")


class RetryBudgetSpent(Exception):
    """The run's retries are spent: storage keeps failing. The message begins with BUDGET_SPENT_MARKER."""


def is_transient(error: BaseException) -> bool:
    """Whether an error reading a file may pass if the read is tried again."""
    if isinstance(error, PERMANENT_ERRORS):
        return False
    if isinstance(error, (TimeoutError, ConnectionError)):
        return True
    if isinstance(error, OSError) and error.errno in TRANSIENT_ERRNOS:
        return True
    return bool(TRANSIENT_TEXT.search(str(error)))


def backoff_s(retry: int, draw: Callable[[], float] = random.random) -> float:
    """The wait before retry number `retry` (0 for the first): full jitter under an exponential cap."""
    return draw() * min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2**retry)


@ray.remote(num_cpus=0)
class RetryBudget:
    """The run's retries: every decode task takes one from here before it retries a read."""

    def __init__(self, retries: int):
        self.left, self.spent = retries, 0

    def take(self) -> bool:
        if self.left <= 0:
            return False
        self.left, self.spent = self.left - 1, self.spent + 1
        return True

    def retries(self) -> int:
        return self.spent


def with_retries(read: Callable[[], T], attempts: int, budget: Optional[ray.actor.ActorHandle] = None,
                 sleep: Callable[[float], None] = time.sleep) -> T:
    """read(), tried up to `attempts` times while it fails transiently; each retry first takes one from
    the run's budget (none outside a run) and waits its backoff. Raises the last error when the attempts
    are spent, and RetryBudgetSpent when the run's budget is."""
    for retry in range(attempts):
        try:
            return read()
        except Exception as error:
            if not is_transient(error) or retry + 1 == attempts:
                raise
            if budget is not None and not ray.get(budget.take.remote()):
                raise RetryBudgetSpent(
                    f"{BUDGET_SPENT_MARKER} the run's read retries (data.read_retry_budget) are spent: storage keeps "
                    f"failing ({type(error).__name__}: {error}); rerun later to go on where this run stopped"
                ) from error
        sleep(backoff_s(retry))
    raise AssertionError("unreachable: the last attempt returns or raises")
