"""Where images come from and results go: one place that turns a path or URI into a filesystem.

pyarrow handles local paths, ``s3://`` (``s3://anonymous@bucket/...`` for public buckets, otherwise the
standard AWS credential chain and ``AWS_ENDPOINT_URL``), ``gs://``, ``hdfs://`` and ``abfs://``; any other
protocol that fsspec knows is wrapped for pyarrow.
"""

import fnmatch
import os
from dataclasses import dataclass

import pyarrow.fs as pafs

GLOB_CHARS = "*?["


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


def list_images(uri: str, extensions: list[str]) -> tuple[Location, list[pafs.FileInfo]]:
    """List the image files under a directory (recursively), matching a glob, or naming one file.

    Returns the location and its image files (path and size), sorted by path. Raises StorageError when
    the path does not exist or cannot be listed.
    """
    pattern = None
    if any(char in uri for char in GLOB_CHARS):
        cut = min(uri.index(char) for char in GLOB_CHARS if char in uri)
        base_uri, slash, _ = uri[:cut].rpartition("/")
        location = resolve((base_uri or "/") if slash else ".")
        pattern = location.join(uri[len(base_uri + slash) :])
    else:
        location = resolve(uri)
    try:
        info = location.filesystem.get_file_info(location.path)
    except OSError as error:
        raise StorageError(f"data.path {uri} cannot be read: {error}") from error
    if info.type == pafs.FileType.NotFound:
        raise StorageError(f"data.path {uri} does not exist")
    if info.type == pafs.FileType.File:
        candidates = [info]
    else:
        selector = pafs.FileSelector(location.path, recursive=True)
        try:
            candidates = location.filesystem.get_file_info(selector)
        except OSError as error:
            raise StorageError(f"data.path {uri} cannot be listed: {error}") from error
    suffixes = tuple("." + extension.lower().lstrip(".") for extension in extensions)
    images = [
        entry
        for entry in candidates
        if entry.type == pafs.FileType.File
        and entry.path.lower().endswith(suffixes)
        and (pattern is None or fnmatch.fnmatchcase(entry.path, pattern))
    ]
    return location, sorted(images, key=lambda entry: entry.path)
