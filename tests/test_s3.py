"""Reading from and writing to S3: a real S3 HTTP endpoint on loopback (moto's server mode), with
credentials from the environment only, as the AWS SDK chain reads them."""

import os
import socket
import subprocess
import sys
import time

import boto3
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pytest
import ray

from app.pipeline import run
from app.results import MANIFEST_NAME
from tests.conftest import FAST_MODEL, compose_config, jpeg_bytes

BUCKET = "detect-test"


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
    env = {"AWS_ACCESS_KEY_ID": "test-key", "AWS_SECRET_ACCESS_KEY": "test-secret", "AWS_ENDPOINT_URL": endpoint, "AWS_REGION": "us-east-1"}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
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
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def test_read_and_write_s3(s3_endpoint):
    for i in range(5):
        s3_endpoint.put_object(Bucket=BUCKET, Key=f"in/sub/img_{i}.JPG", Body=jpeg_bytes(64 + i, 48))
    s3_endpoint.put_object(Bucket=BUCKET, Key="in/broken.png", Body=b"")
    s3_endpoint.put_object(Bucket=BUCKET, Key="in/notes.txt", Body=b"ignored")
    overrides = [*FAST_MODEL, f"data.path=s3://{BUCKET}/in", f"output.path=s3://{BUCKET}/out/run-1", "output.rows_per_file=4"]
    summary = run(compose_config(overrides))
    assert (summary.inputs, summary.processed, summary.ok, summary.errors) == (6, 6, 5, 1)
    assert summary.output_path == f"s3://{BUCKET}/out/run-1"

    filesystem, path = pafs.FileSystem.from_uri(f"s3://{BUCKET}/out/run-1")  # endpoint, keys from the environment
    table = pads.dataset(path, filesystem=filesystem, format="parquet").to_table()
    rows = {row["path"]: row for row in table.to_pylist()}
    assert sorted(rows) == [f"s3://{BUCKET}/in/broken.png"] + [f"s3://{BUCKET}/in/sub/img_{i}.JPG" for i in range(5)]
    assert rows[f"s3://{BUCKET}/in/broken.png"]["error_kind"] == "empty_file"
    assert [rows[f"s3://{BUCKET}/in/sub/img_{i}.JPG"]["width"] for i in range(5)] == [64, 65, 66, 67, 68]
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
