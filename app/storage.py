"""Where images come from and results go: one place that turns a path or URI into a filesystem.

pyarrow handles local paths, ``s3://`` (``s3://anonymous@bucket/...`` for public buckets, otherwise the
standard AWS credential chain and ``AWS_ENDPOINT_URL``), ``gs://``, ``hdfs://`` and ``abfs://``; any other
protocol that fsspec knows is wrapped for pyarrow.
"""

import os
from dataclasses import dataclass

import pyarrow.fs as pafs


class StorageError(Exception):
    """A path that cannot be listed, read or written."""


@dataclass(frozen=True)
class Location:
    """A filesystem, a path on it, and the prefix that turns such paths back into user-facing URIs."""

    filesystem: pafs.FileSystem
    path: str
    uri_prefix: str = ""

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
    prefix = "" if isinstance(filesystem, pafs.LocalFileSystem) else f"{protocol}://"
    return Location(filesystem, path, prefix)


def _fsspec_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(uri)
    except (ImportError, ValueError) as error:
        raise StorageError(f"no filesystem for {uri}: {error}") from error
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path
