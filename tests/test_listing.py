"""Listing data.path (app.listing) on real local trees the tests build: recursion, globs, single files,
odd names, links, special files, and a tree listed in parts finding exactly what one listing finds."""

import os

import pyarrow as pa
import pytest

from app.config import IMAGE_EXTENSIONS
from app.listing import list_inputs, list_part, text_path
from app.storage import StorageError
from tests.support.images import odd_tree


def make_tree(root):
    for name in ["a.jpg", "b.JPEG", "sub/c.png", "sub/deep/d.TIF", "sub/notes.txt", "e.webp", "f.gif", "g.bmp", "h.tiff", "README"]:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * len(name))


def names(table, root):
    return [path[len(str(root)) + 1 :] for path in table.column("path").to_pylist()]


def test_directory_is_listed_recursively_with_case_insensitive_extensions(tmp_path):
    make_tree(tmp_path)
    listed = list_inputs(str(tmp_path), IMAGE_EXTENSIONS)
    assert listed.complete
    assert names(listed.found, tmp_path) == ["a.jpg", "b.JPEG", "e.webp", "f.gif", "g.bmp", "h.tiff", "sub/c.png", "sub/deep/d.TIF"]
    assert listed.found.column("size").to_pylist()[:2] == [5, 6]
    assert set(listed.found.column("error_kind").to_pylist()) == {None}


def test_glob_selects_matching_files_and_star_spans_folders(tmp_path):
    make_tree(tmp_path)
    assert names(list_inputs(str(tmp_path / "sub" / "*.png"), IMAGE_EXTENSIONS).found, tmp_path) == ["sub/c.png"]
    assert names(list_inputs(str(tmp_path / "[ab].*"), IMAGE_EXTENSIONS).found, tmp_path) == ["a.jpg", "b.JPEG"]
    # fnmatch's * matches "/" too: a pattern on the name reaches into sub-folders.
    assert names(list_inputs(str(tmp_path / "*.TIF"), IMAGE_EXTENSIONS).found, tmp_path) == ["sub/deep/d.TIF"]


def test_the_readmes_glob_and_a_star_that_spans_folders(tmp_path):
    """README: data.path may be a glob such as `/data/**/*.jpg`, and `*` may span folders. The pattern is
    matched against the whole path with fnmatch, where `*` matches "/" too (so `**` is two of them)."""
    for name in ["a/x.jpg", "a/b/y.jpg", "a/b/z.png", "a/b/c/w.jpg", "d/e/u.jpg", "d/e/s.txt"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    listed = list_inputs(str(tmp_path / "**" / "*.jpg"), IMAGE_EXTENSIONS)
    assert names(listed.found, tmp_path) == ["a/b/c/w.jpg", "a/b/y.jpg", "a/x.jpg", "d/e/u.jpg"]
    # One * after a folder reaches every depth below it; a * between folders reaches across several.
    assert names(list_inputs(str(tmp_path / "a" / "*.jpg"), IMAGE_EXTENSIONS).found, tmp_path) == [
        "a/b/c/w.jpg", "a/b/y.jpg", "a/x.jpg"]
    assert names(list_inputs(str(tmp_path / "a" / "*" / "w.jpg"), IMAGE_EXTENSIONS).found, tmp_path) == ["a/b/c/w.jpg"]
    assert names(list_inputs(str(tmp_path / "*" / "u.jpg"), IMAGE_EXTENSIONS).found, tmp_path) == ["d/e/u.jpg"]


def test_single_file(tmp_path):
    make_tree(tmp_path)
    assert names(list_inputs(str(tmp_path / "a.jpg"), IMAGE_EXTENSIONS).found, tmp_path) == ["a.jpg"]


def test_missing_path_is_a_storage_error(tmp_path):
    with pytest.raises(StorageError, match=f"^data.path {tmp_path}/nope does not exist$"):
        list_inputs(str(tmp_path / "nope"), IMAGE_EXTENSIONS)


def test_a_folder_named_like_a_glob_is_taken_literally(tmp_path):
    folder = tmp_path / "[2024] photos"
    folder.mkdir()
    (folder / "x.jpg").write_bytes(b"12")
    (tmp_path / "2 photos.jpg").write_bytes(b"1")  # what "[2024] photos" would match as a glob
    assert names(list_inputs(str(folder), IMAGE_EXTENSIONS).found, tmp_path) == ["[2024] photos/x.jpg"]
    # A path that does not exist is a glob.
    assert names(list_inputs(str(tmp_path / "[2] photos.*"), IMAGE_EXTENSIONS).found, tmp_path) == ["2 photos.jpg"]


def test_odd_entries_each_become_exactly_one_row(tmp_path):
    odd_tree(tmp_path)
    rows = {row["path"][len(str(tmp_path)) + 1 :]: row for row in list_inputs(str(tmp_path), IMAGE_EXTENSIONS).found.to_pylist()}
    assert {name: row["error_kind"] for name, row in rows.items()} == {
        "100%.jpg": None,
        "bad%FFutf8.jpg": None,
        "dangling.jpg": "unreadable",
        "dir.jpg": "not_a_file",
        "dir.jpg/in_dir.jpg": None,
        "good.jpg": None,
        "loop.jpg": "unreadable",
        "pipe.jpg": "not_a_file",
        "sub/inner.png": None,
    }
    assert rows["bad%FFutf8.jpg"]["raw_path"] == os.fsencode(str(tmp_path)) + b"/bad\xffutf8.jpg"
    assert rows["bad%FFutf8.jpg"]["size"] == 8
    assert rows["100%.jpg"]["raw_path"] is None  # a valid name keeps its % as it is
    assert rows["dangling.jpg"]["error"] == "broken symbolic link: its target does not exist"
    assert rows["loop.jpg"]["error"] == "cannot be followed: Too many levels of symbolic links"
    assert rows["pipe.jpg"]["error"] == "a FIFO, not a regular file"
    assert rows["dir.jpg"]["error"] == "a folder, not a file"


def test_text_path_escapes_undecodable_bytes_and_percent_in_such_names_only():
    assert text_path(os.fsdecode(b"/d/a%\xff\xfe.jpg")) == ("/d/a%25%FF%FE.jpg", b"/d/a%\xff\xfe.jpg")
    assert text_path("/d/漢字 100%.jpg") == ("/d/漢字 100%.jpg", None)


def test_links_to_folders_outside_are_followed_and_loops_end(tmp_path):
    outside = tmp_path / "outside"
    (outside / "deeper").mkdir(parents=True)
    (outside / "o.jpg").write_bytes(b"o")
    (outside / "deeper" / "back").symlink_to(outside)  # a loop outside data.path
    root = tmp_path / "root"
    root.mkdir()
    (root / "r.jpg").write_bytes(b"r")
    (root / "ext").symlink_to(outside)
    (root / "self").symlink_to(root)  # into data.path: listed under its own path only
    assert names(list_inputs(str(root), IMAGE_EXTENSIONS).found, root) == ["ext/o.jpg", "r.jpg"]


def split_listing(root, pattern_uri, budget):
    """Every row a listing finds when the driver stops after `budget` entries and the parts are listed
    as the Ray tasks list them (list_part, called here in-process)."""
    listed = list_inputs(pattern_uri, IMAGE_EXTENSIONS, budget=budget)
    tables = [listed.found]
    for part in listed.parts:
        tables.extend(list_part(pa.table({"part": [part]}), tree=listed.tree, rows_per_table=3))
    return listed, pa.concat_tables(tables).sort_by("path")


@pytest.mark.parametrize("budget", [1, 4, 9])
def test_a_listing_in_parts_finds_what_one_listing_finds(tmp_path, budget):
    for folder in range(4):
        for depth in range(3):
            path = tmp_path / f"f{folder}" / "/".join(f"d{d}" for d in range(depth)) / f"img{depth}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"x" * (folder + depth))
            (path.parent / "skip.txt").write_bytes(b"-")
    (tmp_path / "top.png").write_bytes(b"top")
    odd_tree(tmp_path / "f1" / "d0")
    # 12 images, top.png and odd_tree's 9 entries named like images; the glob leaves out top.png and sub/inner.png.
    for uri, rows in ((str(tmp_path), 22), (str(tmp_path / "f*" / "*.jpg"), 20)):
        whole = list_inputs(uri, IMAGE_EXTENSIONS)
        listed, parts = split_listing(tmp_path, uri, budget)
        assert whole.complete and not listed.complete
        assert parts.num_rows == whole.found.num_rows == rows
        assert parts.to_pylist() == whole.found.to_pylist()
