"""Listing data.path: which entries are inputs, and how a tree too large for the driver is listed in parts.

Every entry whose name has an image extension (and matches the glob, if data.path is one) becomes one
input row: a file to read, or an error row that says why it cannot be one (a broken link, a FIFO, a
directory named like an image). Local folders are walked with os.scandir; links to folders are followed,
but a link into data.path is not (that folder is listed under its own path) and no folder is walked twice
within a part (by device and inode), so a loop ends. Names that are not valid UTF-8 keep a lossless text
form: each undecodable byte as %XX, and % itself as %25 in such names only.

The driver lists breadth-first until it has seen DRIVER_LISTING_ENTRIES entries. A tree that ends before
that is listed whole (small inputs: sorted, known before any work starts); otherwise the folders not yet
listed are parts, each listed recursively by a Ray task that streams its rows into the pipeline.
"""

import fnmatch
import functools
import os
import stat
from collections import deque
from dataclasses import dataclass, field
from typing import Iterator, Optional

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from app.result_schema import NOT_A_FILE, UNREADABLE
from app.storage import Location, StorageError, resolve

GLOB_CHARS = "*?["
# Entries the driver lists itself before it hands the rest of the tree to Ray tasks.
DRIVER_LISTING_ENTRIES = 20_000

# One input: `path` as the filesystem names it (its text form), `size` in bytes when known, an error
# when the entry cannot be an image, and the name's bytes when they are not valid UTF-8.
INPUT_SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("size", pa.int64()),
        ("error_kind", pa.string()),
        ("error", pa.string()),
        ("raw_path", pa.binary()),
    ]
)


def image_suffixes(extensions: list[str]) -> tuple[str, ...]:
    """data.extensions as lower-case name endings: "JPG" and ".jpg" both give ".jpg"."""
    return tuple("." + extension.lower().lstrip(".") for extension in extensions)


def named(rows: pa.Table, suffixes: tuple[str, ...]) -> pa.ChunkedArray:
    """Which input rows have a name ending with one of `suffixes` (lower-case, as image_suffixes gives them)."""
    lower = pc.utf8_lower(rows.column("path").cast(pa.string()))
    found = pa.chunked_array([pa.array([False] * rows.num_rows, pa.bool_())])
    for suffix in suffixes:
        found = pc.or_(found, pc.fill_null(pc.ends_with(lower, suffix), False))
    return found


def of_kind(rows: pa.Table, *, suffixes: tuple[str, ...], is_video: bool) -> pa.Table:
    """Ray Data UDF: the input rows that are videos (named with the video `suffixes`), or those that are not."""
    videos = named(rows, suffixes)
    return rows.filter(videos if is_video else pc.invert(videos))


def text_path(path: str) -> tuple[str, Optional[bytes]]:
    """The text form of a local path (as os functions give it, undecodable bytes as surrogates), and
    its bytes when they are not valid UTF-8."""
    try:
        path.encode("utf-8")
        return path, None
    except UnicodeEncodeError:
        pass
    text = "".join(
        f"%{ord(char) - 0xDC00:02X}" if 0xDC80 <= ord(char) <= 0xDCFF else "%25" if char == "%" else char for char in path
    )
    return text, os.fsencode(path)


@dataclass
class Rows:
    """Input rows being gathered, column by column."""

    columns: dict = field(default_factory=lambda: {name: [] for name in INPUT_SCHEMA.names})

    def add(self, path: str, size: Optional[int] = None, kind: Optional[str] = None, error: Optional[str] = None):
        text, raw = text_path(path)
        for name, value in zip(INPUT_SCHEMA.names, (text, size, kind, error, raw)):
            self.columns[name].append(value)

    def __len__(self) -> int:
        return len(self.columns["path"])

    def table(self) -> pa.Table:
        return pa.table(self.columns, schema=INPUT_SCHEMA)


@dataclass(frozen=True)
class Tree:
    """What to list: a folder of a filesystem, the suffixes and glob pattern entries must match."""

    location: Location
    suffixes: tuple[str, ...]
    pattern: Optional[str] = None

    @functools.cached_property
    def real_root(self) -> str:
        """data.path with its links resolved: links that lead inside it are not followed."""
        return os.path.realpath(self.location.path)

    @property
    def local(self) -> bool:
        return isinstance(self.location.filesystem, pafs.LocalFileSystem)

    def is_input(self, path: str) -> bool:
        return path.lower().endswith(self.suffixes) and (self.pattern is None or fnmatch.fnmatchcase(path, self.pattern))

    def scan(self, directory: str, rows: Rows, visited: set, limit: Optional[int] = None) -> Optional[list[str]]:
        """Add the inputs directly in `directory` to rows; return its folders to list next, or None
        when it holds more than `limit` entries (rows then holds a part of them)."""
        if self.local:
            return self._scan_local(directory, rows, visited, limit)
        try:
            entries = self.location.filesystem.get_file_info(pafs.FileSelector(directory, recursive=False))
        except OSError as error:
            raise StorageError(f"{self.location.uri(directory)} cannot be listed: {error}") from error
        if limit is not None and len(entries) > limit:
            return None
        folders = []
        for entry in sorted(entries, key=lambda entry: entry.path):
            if entry.type == pafs.FileType.Directory:
                folders.append(entry.path)
            if not self.is_input(entry.path):
                continue
            if entry.type == pafs.FileType.File:
                rows.add(entry.path, entry.size)
            else:
                rows.add(entry.path, kind=NOT_A_FILE, error="a folder, not a file")
        return folders

    def _scan_local(self, directory: str, rows: Rows, visited: set, limit: Optional[int]) -> Optional[list[str]]:
        root = self.real_root
        folders = []
        try:
            with os.scandir(directory) as scan:
                entries = []
                for entry in scan:
                    entries.append(entry)
                    if limit is not None and len(entries) > limit:
                        return None
        except OSError as error:
            raise StorageError(f"{directory} cannot be listed: {error.strerror}") from error
        for entry in sorted(entries, key=lambda entry: entry.name):
            path, is_input = entry.path, self.is_input(entry.path)
            link = entry.is_symlink()
            try:
                info = os.stat(path) if link else entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                if is_input:
                    rows.add(path, kind=UNREADABLE, error="broken symbolic link: its target does not exist")
                continue
            except OSError as error:
                if is_input:
                    rows.add(path, kind=UNREADABLE, error=f"cannot be followed: {error.strerror}")
                continue
            if stat.S_ISDIR(info.st_mode):
                if is_input:
                    rows.add(path, kind=NOT_A_FILE, error="a folder, not a file")
                key = (info.st_dev, info.st_ino)
                into_root = link and (os.path.realpath(path) + "/").startswith(root + "/")
                if key not in visited and not into_root:
                    visited.add(key)
                    folders.append(path)
            elif not is_input:
                continue
            elif stat.S_ISREG(info.st_mode):
                rows.add(path, info.st_size)
            else:
                rows.add(path, kind=NOT_A_FILE, error=f"a {special_kind(info.st_mode)}, not a regular file")
        return folders

    def root_key(self, directory: str) -> set:
        """The visited set a walk from `directory` starts with."""
        if not self.local:
            return set()
        info = os.stat(directory)
        return {(info.st_dev, info.st_ino)}


def special_kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device")):
        if test(mode):
            return name
    return "special file"


@dataclass(frozen=True)
class Listing:
    """data.path listed: the rows the driver found, and the folders left for Ray tasks (none when the
    tree was small enough to list whole)."""

    tree: Tree
    found: pa.Table
    parts: list[str]

    @property
    def complete(self) -> bool:
        return not self.parts


def list_inputs(uri: str, extensions: list[str], budget: Optional[int] = None) -> Listing:
    """List data.path: a folder (recursively), one file, or, when no such path exists, a glob.
    Raises StorageError when it does not exist or cannot be listed."""
    budget = DRIVER_LISTING_ENTRIES if budget is None else budget
    suffixes = image_suffixes(extensions)
    location, pattern = resolve(uri), None
    info = file_info(location, uri)
    if info.type == pafs.FileType.NotFound and any(char in uri for char in GLOB_CHARS):
        cut = min(uri.index(char) for char in GLOB_CHARS if char in uri)
        base_uri, slash, _ = uri[:cut].rpartition("/")
        location = resolve((base_uri or "/") if slash else ".")
        pattern = location.join(uri[len(base_uri + slash) :])
        info = file_info(location, uri)
    if info.type == pafs.FileType.NotFound:
        raise StorageError(f"data.path {uri} does not exist")
    tree = Tree(location, suffixes, pattern)
    rows = Rows()
    if info.type != pafs.FileType.Directory:
        if info.type == pafs.FileType.File:
            rows.add(location.path, info.size)
        else:
            rows.add(location.path, kind=NOT_A_FILE, error="not a regular file")
        return Listing(tree, rows.table(), [])
    visited = tree.root_key(location.path)
    queue, parts = deque([location.path]), []
    while queue:
        directory = queue.popleft()
        left = budget - len(rows)
        before = len(rows)
        folders = tree.scan(directory, rows, visited, limit=max(left, 0)) if left > 0 else None
        if folders is None:
            # Too much for the driver: this folder and those not yet listed go to Ray tasks whole.
            for name in rows.columns:
                del rows.columns[name][before:]
            parts = [directory, *queue]
            break
        queue.extend(folders)
    return Listing(tree, sort_by_path(rows.table()), parts)


def file_info(location: Location, uri: str) -> pafs.FileInfo:
    try:
        return location.filesystem.get_file_info(location.path)
    except OSError as error:
        raise StorageError(f"data.path {uri} cannot be read: {error}") from error


def sort_by_path(table: pa.Table) -> pa.Table:
    return table.sort_by("path") if table.num_rows else table


def list_part(batch: pa.Table, *, tree: Tree, rows_per_table: int = 10_000) -> Iterator[pa.Table]:
    """Ray Data UDF: rows of `part` (folders) in; the inputs under each, listed recursively, out in
    tables of about rows_per_table rows. Folders are walked depth-first, so that the walk holds only
    the folders not yet listed."""
    for part in batch.column("part").to_pylist():
        visited, stack, rows = tree.root_key(part), [part], Rows()
        while stack:
            folders = tree.scan(stack.pop(), rows, visited)
            stack.extend(reversed(folders))
            if len(rows) >= rows_per_table:
                yield sort_by_path(rows.table())
                rows = Rows()
        if len(rows):
            yield sort_by_path(rows.table())


def input_rows(paths: list[str], sizes: list[Optional[int]]) -> pa.Table:
    """Input rows for files known by path and size."""
    rows = Rows()
    for path, size in zip(paths, sizes):
        rows.add(path, size)
    return rows.table()
