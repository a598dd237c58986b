"""Faults that may pass: which storage errors are worth trying again, and the trying again.

A read that fails for a reason that may pass (S3 throttling and 5xx answers, timeouts, reset or refused
connections, a node-local I/O hiccup) is retried with exponential backoff and full jitter, as the AWS SDKs
do: the n-th retry waits a random time between 0 and min(cap, base x 2^n). A read that storage refuses
(not found, permission or access denied, a credential it rejects, a missing bucket) is not retried
either: it is the file's fault or the whole run's, which app.output.verdicts tells apart. Anything else (a
directory, bad bytes) is the input's own fault. Errors are told apart by their type, errno, or the AWS
SDK's error code and HTTP status, never by the file's name inside the message.

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
# Searched in the error's text with the file's own path taken out (`error_text`): a key named
# "SlowDown.jpg" says nothing about the storage.
TRANSIENT_TEXT = re.compile(
    r"HTTP status (429|5\d\d)|SLOW_DOWN|SlowDown|THROTTLING|Throttl|SERVICE_UNAVAILABLE|INTERNAL_FAILURE|"
    r"REQUEST_TIMEOUT|RequestTimeout|NETWORK_CONNECTION|curlCode|Timeout was reached|Connection reset"
)
# pyarrow's S3 errors: "... AWS Error <CODE> [(HTTP status <N>)] during <Operation> operation: <message>".
AWS_ERROR = re.compile(r"AWS Error (\w+)(?: \(HTTP status (\d+)\))? during (\w+) operation")
# The AWS SDK's error codes of a storage that refuses this run, not one file: access denied, a credential
# that is unknown, wrong, expired or signed with a skewed clock, a bucket that does not exist.
REFUSED_CODES = {
    "ACCESS_DENIED", "INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH", "EXPIRED_TOKEN", "INVALID_TOKEN",
    "MISSING_AUTHENTICATION_TOKEN", "INVALID_CLIENT_TOKEN_ID", "UNRECOGNIZED_CLIENT", "REQUEST_EXPIRED",
    "REQUEST_TIME_TOO_SKEWED", "NO_SUCH_BUCKET", "ALL_ACCESS_DISABLED", "ACCOUNT_PROBLEM",
}
REFUSED_STATUSES = {401, 403}
# Errors about the input itself, whatever their text says.
PERMANENT_ERRORS = (IsADirectoryError, NotADirectoryError)
# Errors that say the storage refused a read or found nothing there: the file's own fault, unless every
# file is refused alike (app.output.verdicts tells which).
REFUSED_ERRORS = (FileNotFoundError, PermissionError)

T = TypeVar("T")


class RetryBudgetSpent(Exception):
    """The run's retries are spent: storage keeps failing. The message begins with BUDGET_SPENT_MARKER."""


def error_text(error: BaseException, path: str = "") -> str:
    """The error's text without the path it is about, nor the path's key in its bucket (pyarrow's S3
    errors name the key): a file's name may say anything."""
    text = str(error)
    for name in (path, path.partition("/")[2]):
        if name:
            text = text.replace(name, "")
    return text


def aws_error(error: BaseException, path: str = "") -> tuple[Optional[str], Optional[int]]:
    """The AWS SDK's error code and HTTP status in a pyarrow S3 error, when it has them."""
    found = AWS_ERROR.search(error_text(error, path))
    if found is None:
        return None, None
    return found.group(1), int(found.group(2)) if found.group(2) else None


def is_transient(error: BaseException, path: str = "") -> bool:
    """Whether an error reading `path` may pass if the read is tried again."""
    if isinstance(error, PERMANENT_ERRORS + REFUSED_ERRORS) or is_refused(error, path):
        return False
    if isinstance(error, (TimeoutError, ConnectionError)):
        return True
    if isinstance(error, OSError) and error.errno in TRANSIENT_ERRNOS:
        return True
    return bool(TRANSIENT_TEXT.search(error_text(error, path)))


def is_refused(error: BaseException, path: str = "") -> bool:
    """Whether storage refused to read `path` or found nothing there: not found, permission or access
    denied, a credential it does not accept, a missing bucket. A verdict on the file only once another
    file reads fine (app.output.verdicts); otherwise the run's fault."""
    if isinstance(error, REFUSED_ERRORS):
        return True
    code, status = aws_error(error, path)
    return code in REFUSED_CODES or (code == "UNKNOWN" and status in REFUSED_STATUSES)


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
                 sleep: Callable[[float], None] = time.sleep, path: str = "") -> T:
    """read() (of `path`), tried up to `attempts` times while it fails transiently; each retry first takes one from
    the run's budget (none outside a run) and waits its backoff. Raises the last error when the attempts
    are spent, and RetryBudgetSpent when the run's budget is."""
    for retry in range(attempts):
        try:
            return read()
        except Exception as error:
            if not is_transient(error, path) or retry + 1 == attempts:
                raise
            take_retry(budget, error)
        sleep(backoff_s(retry))
    raise AssertionError("unreachable: the last attempt returns or raises")


def take_retry(budget: Optional[ray.actor.ActorHandle], error: Exception) -> None:
    """Take one retry of `error` from the run's budget (none outside a run); RetryBudgetSpent when it is spent."""
    if budget is not None and not ray.get(budget.take.remote()):
        raise RetryBudgetSpent(
            f"{BUDGET_SPENT_MARKER} the run's read retries (data.read_retry_budget) are spent: storage keeps "
            f"failing ({type(error).__name__}: {error}); rerun later to go on where this run stopped"
        ) from error
