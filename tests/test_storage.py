"""Paths and URIs resolved to filesystems: S3, and fsspec protocols wrapped for pyarrow."""

import fsspec

from app.config import IMAGE_EXTENSIONS
from app.listing import list_inputs
from app.storage import resolve


def test_s3_uri_resolves_anonymously():
    # With the region given, pyarrow needs no network to build the filesystem.
    location = resolve("s3://anonymous@air-example-data/AnimalDetection/JPEGImages?region=us-west-2")
    assert location.path == "air-example-data/AnimalDetection/JPEGImages"
    assert location.uri(location.path) == "s3://air-example-data/AnimalDetection/JPEGImages"
    assert type(location.filesystem).__name__ == "S3FileSystem"
    assert location.filesystem.region == "us-west-2"


def test_fsspec_protocols_are_wrapped():
    memory = fsspec.filesystem("memory")
    memory.pipe("/photos/x.jpg", b"123")
    memory.pipe("/photos/y.txt", b"1")
    listed = list_inputs("memory://photos", IMAGE_EXTENSIONS)
    location, paths = listed.tree.location, listed.found.column("path").to_pylist()
    assert paths == ["/photos/x.jpg"] and listed.found.column("size").to_pylist() == [3]
    assert location.uri(paths[0]) == "memory:///photos/x.jpg"
    with location.filesystem.open_input_stream(paths[0]) as stream:
        assert stream.read() == b"123"
