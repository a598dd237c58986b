"""Listing inputs: recursive folders, globs, single files, case-insensitive extensions, fsspec URIs."""

import fsspec
import pytest

from app.config import IMAGE_EXTENSIONS
from app.storage import StorageError, list_images, resolve


def make_tree(root):
    for name in ["a.jpg", "b.JPEG", "sub/c.png", "sub/deep/d.TIF", "sub/notes.txt", "e.webp", "f.gif", "g.bmp", "h.tiff", "README"]:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * len(name))


def names(files, root):
    return [info.path[len(str(root)) + 1 :] for info in files]


def test_directory_is_listed_recursively_with_case_insensitive_extensions(tmp_path):
    make_tree(tmp_path)
    location, files = list_images(str(tmp_path), IMAGE_EXTENSIONS)
    assert names(files, tmp_path) == ["a.jpg", "b.JPEG", "e.webp", "f.gif", "g.bmp", "h.tiff", "sub/c.png", "sub/deep/d.TIF"]
    assert [info.size for info in files][:2] == [5, 6]
    assert location.uri(files[0].path) == str(tmp_path / "a.jpg")


def test_glob_selects_matching_files(tmp_path):
    make_tree(tmp_path)
    _, files = list_images(str(tmp_path / "sub" / "*.png"), IMAGE_EXTENSIONS)
    assert names(files, tmp_path) == ["sub/c.png"]
    _, files = list_images(str(tmp_path / "[ab].*"), IMAGE_EXTENSIONS)
    assert names(files, tmp_path) == ["a.jpg", "b.JPEG"]


def test_single_file(tmp_path):
    make_tree(tmp_path)
    _, files = list_images(str(tmp_path / "a.jpg"), IMAGE_EXTENSIONS)
    assert names(files, tmp_path) == ["a.jpg"]


def test_missing_path_is_a_storage_error(tmp_path):
    with pytest.raises(StorageError, match=f"^data.path {tmp_path}/nope does not exist$"):
        list_images(str(tmp_path / "nope"), IMAGE_EXTENSIONS)


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
    location, files = list_images("memory://photos", IMAGE_EXTENSIONS)
    assert [info.path for info in files] == ["/photos/x.jpg"]
    assert location.uri(files[0].path) == "memory:///photos/x.jpg"
    with location.filesystem.open_input_stream(files[0].path) as stream:
        assert stream.read() == b"123"
