"""Which read errors are retried (app.retry), the backoff, the per-file attempts and the run's budget, and
the decode stage's verdict on a file whose reads keep failing. The errors are the texts pyarrow's S3
filesystem raised against the fault-injecting endpoint of tests/support/s3_faults.py (moto behind it); the
end-to-end runs through that endpoint are in tests/test_s3.py. Waits are recorded, not slept."""

import errno

import pyarrow as pa
import pytest

from app.decode import DecodeOptions, ImageError, decode_images, read_file
from app.result_schema import REFUSED, TRANSIENT, UNREADABLE
from app.retry import BACKOFF_CAP_S, RetryBudget, RetryBudgetSpent, backoff_s, is_refused, is_transient, with_retries
from tests.support.images import jpeg_bytes

# pyarrow's messages for S3 faults (tests/support/s3_faults.py against moto), one of each kind.
SLOW_DOWN_ON_HEAD = ("When reading information for key 'x.jpg' in bucket 'bkt': AWS Error UNKNOWN (HTTP status 503) "
                     "during HeadObject operation: No response body.")
SLOW_DOWN_ON_GET = "AWS Error INTERNAL_FAILURE during GetObject operation: Failed to flush response stream (eof: 0, bad: 1)"
RESET = ("AWS Error NETWORK_CONNECTION during GetObject operation: curlCode: 52, Server returned nothing (no headers, "
         "no data); Details: Empty reply from server")
TIMEOUT = ("When reading information for key 'x.jpg' in bucket 'bkt': AWS Error NETWORK_CONNECTION during HeadObject "
           "operation: curlCode: 28, Timeout was reached")
ACCESS_DENIED = ("When reading information for key 'private.jpg' in bucket 'bkt': AWS Error ACCESS_DENIED during "
                 "HeadObject operation: No response body.")


@pytest.mark.parametrize("error,transient", [
    (OSError(SLOW_DOWN_ON_HEAD), True),
    (OSError(SLOW_DOWN_ON_GET), True),
    (OSError(RESET), True),
    (OSError(TIMEOUT), True),
    (OSError("AWS Error SLOW_DOWN during GetObject operation: Please reduce your request rate."), True),
    (OSError("AWS Error UNKNOWN (HTTP status 429) during GetObject operation"), True),
    (OSError(errno.EIO, "Input/output error"), True),
    (OSError(errno.ESTALE, "Stale file handle"), True),
    (ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"), True),
    (TimeoutError("timed out"), True),
    (OSError(ACCESS_DENIED), False),
    (FileNotFoundError(errno.ENOENT, "Path does not exist 'bkt/nope.jpg'"), False),
    (PermissionError(errno.EACCES, "Permission denied"), False),
    (IsADirectoryError(errno.EISDIR, "Is a directory"), False),
    (OSError("AWS Error NO_SUCH_BUCKET during HeadObject operation"), False),
    (ValueError("bad bytes"), False),
])
def test_what_may_pass_is_retried_and_what_is_the_inputs_own_fault_is_not(error, transient):
    assert is_transient(error) is transient


def test_backoff_is_full_jitter_under_an_exponential_cap():
    assert [backoff_s(retry, draw=lambda: 1.0) for retry in range(8)] == [0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 10.0, 10.0]
    assert backoff_s(3, draw=lambda: 0.25) == 0.4
    assert BACKOFF_CAP_S == 10.0


class FlakyRead:
    """A read that fails with `error` `failures` times, then returns b"data"."""

    def __init__(self, failures: int, error: Exception):
        self.failures, self.error, self.calls = failures, error, 0

    def __call__(self) -> bytes:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return b"data"


def test_a_read_that_fails_transiently_is_retried_until_it_succeeds():
    waits, read = [], FlakyRead(3, OSError(SLOW_DOWN_ON_GET))
    assert with_retries(read, attempts=5, sleep=waits.append) == b"data"
    assert read.calls == 4 and len(waits) == 3
    assert all(0 <= wait <= cap for wait, cap in zip(waits, [0.2, 0.4, 0.8]))


def test_the_last_attempt_raises_its_error_and_a_permanent_one_is_not_retried():
    waits, read = [], FlakyRead(9, OSError(RESET))
    with pytest.raises(OSError, match="curlCode: 52"):
        with_retries(read, attempts=5, sleep=waits.append)
    assert (read.calls, len(waits)) == (5, 4)
    read = FlakyRead(9, FileNotFoundError(errno.ENOENT, "gone"))
    with pytest.raises(FileNotFoundError):
        with_retries(read, attempts=5, sleep=waits.append)
    assert read.calls == 1


def test_the_runs_budget_counts_every_retry_and_stops_the_run_when_spent(local_ray):
    budget = RetryBudget.remote(3)
    read = FlakyRead(2, OSError(SLOW_DOWN_ON_GET))
    assert with_retries(read, attempts=5, budget=budget, sleep=lambda s: None) == b"data"
    assert local_ray.get(budget.retries.remote()) == 2
    read = FlakyRead(9, OSError(SLOW_DOWN_ON_GET))
    with pytest.raises(RetryBudgetSpent) as caught:
        with_retries(read, attempts=5, budget=budget, sleep=lambda s: None)
    assert str(caught.value) == (
        "ray-detect retry budget spent: the run's read retries (data.read_retry_budget) are spent: storage keeps "
        f"failing (OSError: {SLOW_DOWN_ON_GET}); rerun later to go on where this run stopped")
    assert read.calls == 2  # one retry was left in the budget
    assert local_ray.get(budget.retries.remote()) == 3


class FlakyFilesystem:
    """Stands in for a pyarrow filesystem (the decode stage only opens input streams): each path's reads
    fail with `error` the given number of times, then return its bytes."""

    def __init__(self, files: dict[str, bytes], failures: dict[str, int], error: Exception):
        self.files, self.failures, self.error = files, dict(failures), error
        self.opened: list[str] = []

    def open_input_stream(self, path):
        self.opened.append(path)
        if self.failures.get(path, 0) > 0:
            self.failures[path] -= 1
            raise self.error
        return pa.BufferReader(self.files[path])


OPTIONS = DecodeOptions(max_file_bytes=10**6, max_image_pixels=10**6, read_attempts=3)


def test_a_file_still_failing_after_its_attempts_is_transient_and_a_lost_one_unreadable(monkeypatch):
    monkeypatch.setattr("app.retry.time.sleep", lambda seconds: None)
    filesystem = FlakyFilesystem({"a.jpg": jpeg_bytes()}, {"a.jpg": 3}, OSError(SLOW_DOWN_ON_GET))
    with pytest.raises(ImageError) as caught:
        read_file(filesystem, "a.jpg", None, OPTIONS)
    assert (caught.value.kind, str(caught.value)) == (TRANSIENT, f"still failing after 3 attempts: {SLOW_DOWN_ON_GET}")
    assert filesystem.opened == ["a.jpg"] * 3
    filesystem = FlakyFilesystem({}, {"b.jpg": 1}, OSError(ACCESS_DENIED))
    with pytest.raises(ImageError) as caught:
        read_file(filesystem, "b.jpg", None, OPTIONS)
    assert (caught.value.kind, str(caught.value), filesystem.opened) == (REFUSED, ACCESS_DENIED, ["b.jpg"])
    filesystem = FlakyFilesystem({}, {"c.jpg": 1}, OSError(errno.EISDIR, "Is a directory"))
    with pytest.raises(ImageError) as caught:
        read_file(filesystem, "c.jpg", None, OPTIONS)
    assert (caught.value.kind, str(caught.value)) == (UNREADABLE, "[Errno 21] Is a directory")


# A key named like a throttling answer, and what pyarrow says when storage denies reading it.
THROTTLING_NAME = "bkt/in/SlowDown Throttl HTTP status 503 AWS Error SLOW_DOWN during GetObject operation.jpg"
DENIED_THROTTLING_NAME = (f"When reading information for key '{THROTTLING_NAME.partition('/')[2]}' in bucket 'bkt': AWS Error "
                          "ACCESS_DENIED during HeadObject operation: No response body.")


@pytest.mark.parametrize("error, path, refused", [
    (OSError(ACCESS_DENIED), "bkt/private.jpg", True),
    (OSError(DENIED_THROTTLING_NAME), THROTTLING_NAME, True),
    (OSError("AWS Error INVALID_ACCESS_KEY_ID during ListObjectsV2 operation: The AWS Access Key Id you provided does "
             "not exist in our records."), "", True),
    (OSError("AWS Error NO_SUCH_BUCKET during CreateMultipartUpload operation: The specified bucket does not exist"), "", True),
    (OSError("AWS Error UNKNOWN (HTTP status 403) during GetObject operation"), "", True),
    (FileNotFoundError(errno.ENOENT, "Path does not exist 'bkt/nope.jpg'"), "bkt/nope.jpg", True),
    (PermissionError(errno.EACCES, "Permission denied"), "", True),
    (OSError(SLOW_DOWN_ON_HEAD), "bkt/x.jpg", False),
    (OSError(RESET), "", False),
    (IsADirectoryError(errno.EISDIR, "Is a directory"), "", False),
])
def test_what_storage_refuses_is_told_by_the_error_code_never_by_the_files_name(error, path, refused):
    """Refused reads are not retried: a key named like a throttling answer and denied is refused, not
    retried run after run; a 503 on a key named like a denial is still transient."""
    assert (is_refused(error, path), is_transient(error, path)) == (refused, not refused and not isinstance(error, IsADirectoryError))


def test_a_throttled_key_named_like_a_denial_is_transient():
    path = "bkt/AWS Error ACCESS_DENIED during HeadObject operation.jpg"
    error = OSError(f"When reading information for key '{path.partition('/')[2]}' in bucket 'bkt': AWS Error UNKNOWN "
                    "(HTTP status 503) during HeadObject operation: No response body.")
    assert (is_refused(error, path), is_transient(error, path)) == (False, True)


def test_a_read_interrupted_by_the_retry_budgets_death_is_transient_never_a_verdict(local_ray):
    """The budget's actor dies (killed, no restart) while a read waits on it: the file's row is TRANSIENT,
    not committed, instead of a corrupt_image verdict. (In a run the actor is restarted and its calls
    retried: tests/test_s3.py kills it mid-run.)"""
    budget = RetryBudget.remote(10)
    local_ray.kill(budget, no_restart=True)
    filesystem = FlakyFilesystem({"a.jpg": jpeg_bytes()}, {"a.jpg": 1}, OSError(SLOW_DOWN_ON_GET))
    batch = pa.table({"path": ["a.jpg"], "size": [None], "error_kind": pa.nulls(1, pa.string()),
                      "error": pa.nulls(1, pa.string()), "raw_path": pa.nulls(1, pa.binary())})
    (row,) = decode_images(batch, filesystem=filesystem, uri_prefix="", options=OPTIONS, budget=budget).to_pylist()
    assert (row["error_kind"], row["error"].split(":")[0]) == (TRANSIENT, "the read was interrupted")
    assert "ActorDiedError" in row["error"] or "RayActorError" in row["error"]


def test_the_decode_stage_retries_each_file_on_its_own(monkeypatch):
    monkeypatch.setattr("app.retry.time.sleep", lambda seconds: None)
    files = {name: jpeg_bytes(40, 30) for name in ("a.jpg", "b.jpg", "c.jpg")}
    filesystem = FlakyFilesystem(files, {"a.jpg": 2, "c.jpg": 5}, OSError(RESET))
    batch = pa.table({"path": list(files), "size": [None] * 3, "error_kind": pa.nulls(3, pa.string()),
                      "error": pa.nulls(3, pa.string()), "raw_path": pa.nulls(3, pa.binary())})
    rows = decode_images(batch, filesystem=filesystem, uri_prefix="s3://", options=OPTIONS).to_pylist()
    assert [(row["path"], row["width"], row["error_kind"]) for row in rows] == [
        ("s3://a.jpg", 40, None), ("s3://b.jpg", 40, None), ("s3://c.jpg", None, TRANSIENT)]
    assert filesystem.opened == ["a.jpg"] * 3 + ["b.jpg"] + ["c.jpg"] * 3
