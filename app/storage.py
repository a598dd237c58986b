"""Where images come from and results go: one place that turns a path or URI into a filesystem.

pyarrow handles local paths, ``s3://`` (``s3://anonymous@bucket/...`` for public buckets, otherwise the
standard AWS credential chain and ``AWS_ENDPOINT_URL``), ``gs://``, ``hdfs://`` and ``abfs://``; any other
protocol that fsspec knows is wrapped for pyarrow.

Retries of the storage clients, set here on purpose: S3 calls through pyarrow use the AWS SDK's standard
retry mode with 3 attempts (pyarrow's default, which is also what a filesystem gets after travelling to a
Ray task: its retry strategy is not pickled), except image reads in the decode stage, which pyarrow tries
once (`for_image_reads`) because app.retry retries them, with its own backoff, budget and count. boto3
(the lease's conditional write) uses the standard retry mode with 3 attempts too.
"""

import os
from dataclasses import dataclass
from typing import Any, Optional

import pyarrow.fs as pafs


# The AWS SDK's standard retry mode: exponential backoff with jitter, throttling and 5xx answers retried.
S3_ATTEMPTS = 3
BOTO3_RETRIES = {"mode": "standard", "max_attempts": S3_ATTEMPTS}


class StorageError(Exception):
    """A path that cannot be listed, read or written."""


@dataclass(frozen=True)
class Location:
    """A filesystem, a path on it, and the prefix that turns such paths back into user-facing URIs."""

    filesystem: pafs.FileSystem
    path: str
    uri_prefix: str = ""
    # The table the result rows go to, when a run's output is one (app.output.tables): the location is then
    # the folder of the run's bookkeeping only.
    table: Optional[Any] = None

    def uri(self, path: str) -> str:
        return self.uri_prefix + path

    def join(self, *parts: str) -> str:
        return "/".join([self.path.rstrip("/"), *parts])


def absolute(uri: str) -> str:
    """A local path made absolute; URIs as they are."""
    return uri if "://" in uri else os.path.abspath(os.path.expanduser(uri))


def resolve(uri: str) -> Location:
    """Return the filesystem and path for a local path or URI."""
    if "://" not in uri:
        return Location(pafs.LocalFileSystem(), absolute(uri))
    protocol = uri.split("://", 1)[0]
    try:
        filesystem, path = pafs.FileSystem.from_uri(uri)
    except (ValueError, OSError) as error:
        if "Unrecognized filesystem type" not in str(error):
            raise StorageError(f"cannot open {uri}: {error}") from error
        filesystem, path = _fsspec_filesystem(uri)
    if isinstance(filesystem, pafs.S3FileSystem):
        filesystem = with_s3_attempts(filesystem, S3_ATTEMPTS)
    prefix = "" if isinstance(filesystem, pafs.LocalFileSystem) else f"{protocol}://"
    return Location(filesystem, path, prefix)


def with_s3_attempts(filesystem: pafs.S3FileSystem, attempts: int) -> pafs.S3FileSystem:
    """The same S3 filesystem (credentials, region, endpoint, options) whose calls pyarrow tries `attempts`
    times in the AWS SDK's standard retry mode."""
    _, (options,) = filesystem.__reduce__()  # the options it was made with, as pickling keeps them
    return pafs.S3FileSystem(**options, retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=attempts))


def for_image_reads(filesystem: pafs.FileSystem) -> pafs.FileSystem:
    """The filesystem the decode stage reads images with: on S3, one attempt per call, since app.retry
    retries those reads itself; any other filesystem as it is."""
    if isinstance(filesystem, pafs.S3FileSystem):
        return with_s3_attempts(filesystem, 1)
    return filesystem


def _fsspec_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(uri)
    except (ImportError, ValueError) as error:
        raise StorageError(f"no filesystem for {uri}: {error}") from error
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path
