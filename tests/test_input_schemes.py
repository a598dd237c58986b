"""data.allowed_schemes on the paths a manifest lists: the manifest's UDF (app.inventory.manifest_rows) and
the decode stage called in-process, without Ray. A path of a scheme not allowed is an error row, never
opened; allowed, it is read. The web server is a real one on 127.0.0.1 (an ephemeral port, in a thread),
read through fsspec's HTTP filesystem as a run reads it."""

import functools
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pytest

from app import inventory, listing
from app.config import STORAGE_SCHEMES
from app.decode import DecodeOptions, decode_images
from tests.support.images import jpeg_bytes

SUFFIXES = listing.image_suffixes(["jpg"])


@pytest.fixture()
def web_server(tmp_path):
    """(base URL, paths asked for) of a web server that serves tmp_path/web."""
    (tmp_path / "web").mkdir()
    asked = []

    class Handler(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            asked.append(self.path)

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(tmp_path / "web")))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", asked
    server.shutdown()
    server.server_close()


def manifest_of(tmp_path, paths, allowed=STORAGE_SCHEMES):
    pacsv.write_csv(pa.table({"path": paths}), tmp_path / "list.csv")
    manifest = inventory.open_manifest(str(tmp_path / "list.csv"), allowed)
    return manifest, inventory.manifest_rows(pacsv.read_csv(tmp_path / "list.csv"), manifest=manifest, suffixes=SUFFIXES)


def decoded(manifest, rows):
    options = DecodeOptions(max_file_bytes=10**6, max_image_pixels=10**6)
    return decode_images(rows, filesystem=manifest.images.filesystem, uri_prefix=manifest.images.uri_prefix, options=options).to_pylist()


def test_a_listed_path_of_a_scheme_not_allowed_is_an_error_row(tmp_path, web_server):
    """The first path is local, so the images' filesystem is; the web addresses are error rows of kind
    unreadable (the input's fault: data.retry_errors=[unreadable] reads them again once allowed), and the
    web server is never asked."""
    base, asked = web_server
    (tmp_path / "web" / "a.jpg").write_bytes(jpeg_bytes(30, 20))
    (tmp_path / "b.jpg").write_bytes(jpeg_bytes(30, 20))
    manifest, rows = manifest_of(tmp_path, [str(tmp_path / "b.jpg"), f"{base}/a.jpg", f"HTTPS://{base[7:]}/a.jpg"])
    refused = [(f"{base}/a.jpg", "unreadable", "its scheme 'http' is not in data.allowed_schemes"),
               (f"HTTPS://{base[7:]}/a.jpg", "unreadable", "its scheme 'https' is not in data.allowed_schemes")]
    assert [(row["path"], row["error_kind"], row["error"]) for row in rows.to_pylist()] == [
        (str(tmp_path / "b.jpg"), None, None), *refused]
    out = decoded(manifest, rows)
    assert [(row["path"], row["error_kind"], row["error"]) for row in out] == [(str(tmp_path / "b.jpg"), None, None), *refused]
    assert asked == []


def test_a_first_path_of_a_scheme_not_allowed_opens_no_filesystem(tmp_path, web_server):
    """The images' filesystem is that of the first path: one not allowed is never made (fsspec's HTTP
    filesystem is not even built), its paths are error rows, the others not on it."""
    base, asked = web_server
    manifest, rows = manifest_of(tmp_path, [f"{base}/a.jpg", "s3://bucket/c.jpg"])
    assert isinstance(manifest.images.filesystem, pafs.LocalFileSystem) and manifest.images.uri_prefix == ""
    assert [(row["path"], row["error_kind"], row["error"]) for row in decoded(manifest, rows)] == [
        (f"{base}/a.jpg", "unreadable", "its scheme 'http' is not in data.allowed_schemes"),
        ("s3://bucket/c.jpg", "unreadable", "not on the filesystem of the manifest's first path (http://)")]
    assert asked == []


def test_with_the_scheme_allowed_the_path_is_read(tmp_path, web_server):
    """data.allowed_schemes=[file, http]: the web address is an input like any other, read from the web
    server and decoded; its row keeps its URL, and a local path is then not on the images' filesystem."""
    base, asked = web_server
    (tmp_path / "web" / "a.jpg").write_bytes(jpeg_bytes(30, 20))
    manifest, rows = manifest_of(tmp_path, [f"{base}/a.jpg", str(tmp_path / "b.jpg")], ["file", "HTTP"])
    assert [(row["path"], row["error_kind"]) for row in rows.to_pylist()] == [(f"{base}/a.jpg", None), (str(tmp_path / "b.jpg"), "unreadable")]
    out = decoded(manifest, rows)
    assert [(row["path"], row["width"], row["height"], row["error_kind"]) for row in out] == [
        (f"{base}/a.jpg", 30, 20, None), (str(tmp_path / "b.jpg"), None, None, "unreadable")]
    assert out[1]["error"] == "not on the filesystem of the manifest's first path (http://)"
    assert "/a.jpg" in asked
