"""Reading from and writing to S3: a real S3 HTTP endpoint on loopback (moto's server mode), with
credentials from the environment only, as the AWS SDK chain reads them."""

import gzip
import json
import os
import socket
import subprocess
import sys
import time
import urllib.parse

import boto3
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import ray

from app import listing
from app.output.dataset import MANIFEST_NAME
from app.output.lease import create_exclusive
from app.pipeline import run
from app.s3_faults import environment
from app.storage import resolve
from tests.conftest import (
    FAST_MODEL,
    assert_detections,
    compose_config,
    gradient_jpeg,
    jpeg_bytes,
    model_detections,
)

BUCKET = "detect-test"
# The stand-in endpoint's keys, distinctive enough to be searched for in what a run writes and logs.
KEY_ID, SECRET_KEY = "AKIAPLANTED7ZQ2XVD9K", "planted/secret+7Zq2xVd9kW4mN8pR"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def s3_endpoint():
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    # Dummy keys for the stand-in endpoint, set the way a user sets real ones: in the environment.
    env = {"AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_ENDPOINT_URL": endpoint, "AWS_REGION": "us-east-1"}
    with environment(env):
        deadline = time.monotonic() + 30
        while True:
            try:
                boto3.client("s3").create_bucket(Bucket=BUCKET)
                break
            except Exception:
                if time.monotonic() > deadline:
                    server.kill()
                    raise
                time.sleep(0.3)
        # Ray workers inherit the environment of the Ray instance, started after the variables are set.
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=300 * 1024**2)
        yield boto3.client("s3")
        ray.shutdown()
        server.kill()


def test_read_and_write_s3(s3_endpoint):
    images = {f"s3://{BUCKET}/in/sub/img_{i}.JPG": gradient_jpeg(64 + i, 48, i) for i in range(5)}
    for uri, data in images.items():
        s3_endpoint.put_object(Bucket=BUCKET, Key=uri.removeprefix(f"s3://{BUCKET}/"), Body=data)
    s3_endpoint.put_object(Bucket=BUCKET, Key="in/broken.png", Body=b"")
    s3_endpoint.put_object(Bucket=BUCKET, Key="in/notes.txt", Body=b"ignored")
    # One image per model call: the five sizes differ, and a batch pads its images to the largest one,
    # which changes their detections; alone, each gets what the model gives it here, alone too.
    overrides = [*FAST_MODEL, f"data.path=s3://{BUCKET}/in", f"output.path=s3://{BUCKET}/out/run-1", "output.rows_per_file=4",
                 "inference.batch_size=1"]
    summary = run(compose_config(overrides))
    assert (summary.inputs, summary.processed, summary.ok, summary.errors) == (6, 6, 5, 1)
    assert summary.output_path == f"s3://{BUCKET}/out/run-1"

    filesystem, path = pafs.FileSystem.from_uri(f"s3://{BUCKET}/out/run-1")  # endpoint, keys from the environment
    table = pads.dataset(path, filesystem=filesystem, format="parquet").to_table()
    rows = {row["path"]: row for row in table.to_pylist()}
    assert sorted(rows) == [f"s3://{BUCKET}/in/broken.png"] + [f"s3://{BUCKET}/in/sub/img_{i}.JPG" for i in range(5)]
    assert rows[f"s3://{BUCKET}/in/broken.png"]["error_kind"] == "empty_file"
    assert [rows[f"s3://{BUCKET}/in/sub/img_{i}.JPG"]["width"] for i in range(5)] == [64, 65, 66, 67, 68]
    assert_detections({path: rows[path] for path in images}, model_detections(compose_config(overrides), images, images.get))
    listing = s3_endpoint.list_objects_v2(Bucket=BUCKET, Prefix="out/run-1/")["Contents"]
    keys = sorted(obj["Key"] for obj in listing if not obj["Key"].endswith("/"))  # pyarrow's directory markers
    assert keys[:2] == ["out/run-1/_manifest.json", "out/run-1/_settings.json"]
    assert len(keys) == 4 and all(key.startswith("out/run-1/part-") for key in keys[2:])  # 4 + 2 rows

    again = run(compose_config(overrides))
    assert (again.inputs, again.processed) == (6, 0)


def test_anonymous_bucket_uri_reads_public_objects(s3_endpoint):
    s3_endpoint.put_object(Bucket=BUCKET, Key="public/a.jpg", Body=jpeg_bytes(), ACL="public-read")
    s3_endpoint.put_object(Bucket=BUCKET, Key="public/private.jpg", Body=jpeg_bytes())  # not readable anonymously
    summary = run(compose_config([*FAST_MODEL, f"data.path=s3://anonymous@{BUCKET}/public", f"output.path=s3://{BUCKET}/out/anon"]))
    assert (summary.inputs, summary.ok, summary.errors_by_kind) == (2, 1, {"unreadable": 1})
    filesystem, path = pafs.FileSystem.from_uri(f"s3://{BUCKET}/out/anon")
    rows = {row["path"]: row for row in pads.dataset(path, filesystem=filesystem, format="parquet").to_table().to_pylist()}
    assert rows[f"s3://{BUCKET}/public/a.jpg"]["error"] is None
    assert "ACCESS_DENIED" in rows[f"s3://{BUCKET}/public/private.jpg"]["error"]
    body = s3_endpoint.get_object(Bucket=BUCKET, Key=f"out/anon/{MANIFEST_NAME}")["Body"].read()
    assert b'"unreadable": 1' in body


def test_an_s3_inventory_report_gives_one_row_per_listed_image(s3_endpoint):
    """The layout AWS writes: <prefix>/<source bucket>/<config>/<date>/manifest.json naming gzipped,
    header-less CSV files under <config>/data/, with URL-encoded keys."""
    keys = ["inv/a b.jpg", "inv/sub/c+d.png", "inv/notes.txt", "inv/gone.jpg"]
    for key in keys[:3]:
        s3_endpoint.put_object(Bucket=BUCKET, Key=key, Body=jpeg_bytes(40, 30))
    lines = "".join(f'"{BUCKET}","{urllib.parse.quote_plus(key, safe="/")}","{len(jpeg_bytes(40, 30))}"\n' for key in keys)
    s3_endpoint.put_object(Bucket=BUCKET, Key="reports/detect-test/daily/data/0001.csv.gz", Body=gzip.compress(lines.encode()))
    report = {
        "sourceBucket": BUCKET, "destinationBucket": f"arn:aws:s3:::{BUCKET}", "fileFormat": "CSV",
        "fileSchema": "Bucket, Key, Size", "files": [{"key": "reports/detect-test/daily/data/0001.csv.gz", "size": 1}],
    }
    s3_endpoint.put_object(Bucket=BUCKET, Key="reports/detect-test/daily/2026-11-27T01-00Z/manifest.json", Body=json.dumps(report))
    overrides = [*FAST_MODEL, f"data.manifest=s3://{BUCKET}/reports/detect-test/daily/2026-11-27T01-00Z/manifest.json",
                 f"output.path=s3://{BUCKET}/out/inventory"]
    summary = run(compose_config(overrides))
    filesystem, path = pafs.FileSystem.from_uri(f"s3://{BUCKET}/out/inventory")
    rows = {row["path"]: row for row in pads.dataset(path, filesystem=filesystem, format="parquet").to_table().to_pylist()}
    assert {path: row["error_kind"] for path, row in rows.items()} == {
        f"s3://{BUCKET}/inv/a b.jpg": None, f"s3://{BUCKET}/inv/sub/c+d.png": None, f"s3://{BUCKET}/inv/gone.jpg": "unreadable"}
    assert (summary.inputs, summary.ok) == (3, 2)
    assert run(compose_config(overrides)).processed == 0


def test_a_prefix_listed_in_parts_finds_every_key_once(s3_endpoint, monkeypatch):
    monkeypatch.setattr(listing, "DRIVER_LISTING_ENTRIES", 2)
    expected = {f"parts/{folder}/img_{i}.jpg" for folder in "abc" for i in range(3)}
    for key in expected:
        s3_endpoint.put_object(Bucket=BUCKET, Key=key, Body=jpeg_bytes())
    summary = run(compose_config([*FAST_MODEL, f"data.path=s3://{BUCKET}/parts", f"output.path=s3://{BUCKET}/out/parts"]))
    filesystem, path = pafs.FileSystem.from_uri(f"s3://{BUCKET}/out/parts")
    paths = pads.dataset(path, filesystem=filesystem, format="parquet").to_table().column("path").to_pylist()
    assert sorted(paths) == sorted(f"s3://{BUCKET}/{key}" for key in expected)
    assert (summary.inputs, summary.processed, summary.ok) == (9, 9, 9)


def test_the_lease_is_created_with_a_conditional_write(s3_endpoint):
    output = resolve(f"s3://{BUCKET}/out/leased")
    assert create_exclusive(output, f"{BUCKET}/out/leased/_lease.json", {"owner": "a"})
    assert not create_exclusive(output, f"{BUCKET}/out/leased/_lease.json", {"owner": "b"})
    body = s3_endpoint.get_object(Bucket=BUCKET, Key="out/leased/_lease.json")["Body"].read()
    assert json.loads(body) == {"owner": "a"}


def test_a_parquet_manifest_on_s3_lists_s3_images(s3_endpoint):
    for i in range(3):
        s3_endpoint.put_object(Bucket=BUCKET, Key=f"listed/{i}.jpg", Body=jpeg_bytes(50 + i, 40))
    paths = [f"s3://{BUCKET}/listed/{i}.jpg" for i in range(3)] + [f"s3://{BUCKET}/listed/missing.jpg", f"s3://{BUCKET}/listed/x.txt"]
    buffer = pa.BufferOutputStream()
    pq.write_table(pa.table({"path": paths}), buffer)
    s3_endpoint.put_object(Bucket=BUCKET, Key="lists/images.parquet", Body=buffer.getvalue().to_pybytes())
    summary = run(compose_config([*FAST_MODEL, f"data.manifest=s3://{BUCKET}/lists/images.parquet", f"output.path=s3://{BUCKET}/out/listed"]))
    filesystem, path = pafs.FileSystem.from_uri(f"s3://{BUCKET}/out/listed")
    rows = {row["path"]: row for row in pads.dataset(path, filesystem=filesystem, format="parquet").to_table().to_pylist()}
    assert {p: (row["error_kind"], row["width"]) for p, row in rows.items()} == {
        **{f"s3://{BUCKET}/listed/{i}.jpg": (None, 50 + i) for i in range(3)}, f"s3://{BUCKET}/listed/missing.jpg": ("unreadable", None)}
    assert (summary.inputs, summary.ok) == (4, 3)


def test_no_secret_in_any_file_a_run_writes_nor_in_its_log(s3_endpoint):
    """The command line, attached to this module's Ray, whose workers hold the same environment. Secrets
    reach the run two ways: the storage keys in the environment, and a value the config takes from the
    environment through ${oc.env:...} (here metrics.run, which only labels metrics). Neither appears in
    any object the run leaves under output.path (rows, settings, manifest) nor in its stdout or stderr:
    the manifest records the interpolation as written. A URI with user:password@ is refused with exit
    code 2 before any work, in a line that names the key and not the secret."""
    for i in range(3):
        s3_endpoint.put_object(Bucket=BUCKET, Key=f"secret-in/{i}.jpg", Body=jpeg_bytes(60 + i, 40))
    planted = {"RUN_LABEL_SECRET": "planted-env-value-Q8w3Lp0x"}
    command = [sys.executable, "-m", "app", *FAST_MODEL, f"ray.address={ray.get_runtime_context().gcs_address}",
               f"output.path=s3://{BUCKET}/out/secret", "metrics.run=${oc.env:RUN_LABEL_SECRET}"]
    result = subprocess.run([*command, f"data.path=s3://{BUCKET}/secret-in"], env={**os.environ, **planted},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ray-detect: 3 images (3 ok, 0 errors: none), " in result.stdout
    keys = [o["Key"] for o in s3_endpoint.list_objects_v2(Bucket=BUCKET, Prefix="out/secret/")["Contents"]]
    assert len([key for key in keys if key.endswith(".parquet")]) == 1
    written = {key: s3_endpoint.get_object(Bucket=BUCKET, Key=key)["Body"].read() for key in keys}
    manifest = json.loads(written[f"out/secret/{MANIFEST_NAME}"])
    assert manifest["config"]["metrics"]["run"] == "${oc.env:RUN_LABEL_SECRET}"
    for secret in (KEY_ID, SECRET_KEY, planted["RUN_LABEL_SECRET"]):
        assert [key for key, data in written.items() if secret.encode() in data] == []
        assert secret not in result.stdout + result.stderr

    in_uri = f"s3://{KEY_ID}:{SECRET_KEY}@{BUCKET}/secret-in"
    refused = subprocess.run([*command, f"data.path={in_uri}"], capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2
    assert refused.stderr.splitlines()[-1] == (
        "ray-detect: config error: data.path holds credentials (user:password@ in its URI); give them to the storage "
        "client through its environment (AWS_ACCESS_KEY_ID, ...) or a mounted Secret instead")
    assert SECRET_KEY not in refused.stdout + refused.stderr
