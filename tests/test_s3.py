"""Reading from and writing to S3: a real S3 HTTP endpoint on loopback (moto's server mode), with
credentials from the environment only, as the AWS SDK chain reads them. The runs reach it through the
fault-injecting proxy of tests/support/s3_faults.py (the tests put their objects into moto directly),
which passes requests on untouched until a test sets its rules: then it answers chosen GETs of images with 503
SlowDown or 500 InternalError, the way S3 and networks fail. A fault that may pass is retried and never becomes a committed verdict on the image; a file
that keeps failing has no row, and a rerun reads it. (Resets and timeouts are classified in
tests/test_retry.py, from the errors pyarrow raised through the proxy.) One endpoint and one Ray serve
the module."""

import gzip
import json
import os
import re
import subprocess
import sys
import urllib.parse

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import ray

from app import listing
from app.commit import InputsLeft
from app.output.dataset import LEASE_DIR, MANIFEST_NAME, TRANSIENT_NAME, lease_path
from app.output.lease import OutputLease, create_exclusive
from app.pipeline import run
from app.storage import resolve
from app.config import compose_config
from tests.support.s3_faults import ACCESS_DENIED, DELAY, INTERNAL_ERROR, RESET, SLOW_DOWN, Rule, moto_behind_proxy
from tests.support.images import gradient_jpeg, jpeg_bytes
from tests.support.models import FAST_MODEL, VIDEOS, assert_detections, model_detections
from tests.support.videos import write_video

pytestmark = pytest.mark.slow  # moto's server and runs on Ray

BUCKET = "detect-test"
# The stand-in endpoint's keys, distinctive enough to be searched for in what a run writes and logs.
KEY_ID, SECRET_KEY = "AKIAPLANTED7ZQ2XVD9K", "planted/secret+7Zq2xVd9kW4mN8pR"
# The fault tests' bucket, and the images under its in/.
FAULTS_BUCKET = "faults-test"
IMAGES = 40


@pytest.fixture(scope="module")
def s3_service():
    """moto's server behind the proxy, with the keys set in the environment the way a user sets real ones,
    and the Ray of this module's runs: started after the variables are set, its workers inherit them.
    Yields the proxy and a boto3 client that talks to moto directly, never faulted."""
    with moto_behind_proxy(BUCKET, keys=(KEY_ID, SECRET_KEY)) as (proxy, client):
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=300 * 1024**2)
        try:
            yield proxy, client
        finally:
            ray.shutdown()


@pytest.fixture
def s3_endpoint(s3_service):
    return s3_service[1]


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
    assert keys[:3] == ["out/run-1/_lease/0000000001.json", "out/run-1/_manifest.json", "out/run-1/_settings.json"]
    assert len(keys) == 5 and all(key.startswith("out/run-1/part-g0000000001-") for key in keys[3:])  # 4 + 2 rows

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


def test_an_s3_inventory_report_of_all_versions_gives_one_row_per_live_key(s3_endpoint):
    """A report with IsLatest and IsDeleteMarker lists a key once per version and per delete marker: a key
    of one version, one of two, and a deleted one (an older version and a delete marker) give two inputs."""
    versions = [("a.jpg", "a1", "true", "false"), ("b.jpg", "b1", "false", "false"), ("b.jpg", "b2", "true", "false"),
                ("c.jpg", "c1", "false", "false"), ("c.jpg", "c2", "true", "true")]
    for key in ("a.jpg", "b.jpg"):
        s3_endpoint.put_object(Bucket=BUCKET, Key=f"versioned/{key}", Body=jpeg_bytes(40, 30))
    lines = "".join(f'"{BUCKET}","versioned/{key}","{version}","{latest}","{marker}","{"" if marker == "true" else 9}"\n'
                    for key, version, latest, marker in versions)
    s3_endpoint.put_object(Bucket=BUCKET, Key="reports/versions/all/data/0001.csv.gz", Body=gzip.compress(lines.encode()))
    report = {"sourceBucket": BUCKET, "fileFormat": "CSV", "fileSchema": "Bucket, Key, VersionId, IsLatest, IsDeleteMarker, Size",
              "files": [{"key": "reports/versions/all/data/0001.csv.gz"}]}
    s3_endpoint.put_object(Bucket=BUCKET, Key="reports/versions/all/2026-11-27T01-00Z/manifest.json", Body=json.dumps(report))
    overrides = [*FAST_MODEL, f"data.manifest=s3://{BUCKET}/reports/versions/all/2026-11-27T01-00Z/manifest.json",
                 f"output.path=s3://{BUCKET}/out/versions"]
    summary = run(compose_config(overrides))
    filesystem, path = pafs.FileSystem.from_uri(f"s3://{BUCKET}/out/versions")
    rows = pads.dataset(path, filesystem=filesystem, format="parquet").to_table(columns=["path", "error_kind"]).to_pylist()
    assert sorted((row["path"], row["error_kind"]) for row in rows) == [
        (f"s3://{BUCKET}/versioned/a.jpg", None), (f"s3://{BUCKET}/versioned/b.jpg", None)]
    assert (summary.inputs, summary.ok) == (2, 2)
    assert run(compose_config(overrides)).processed == 0


def test_a_prefix_listed_in_parts_finds_every_key_once_and_each_chosen_frame_of_a_video(s3_endpoint, monkeypatch, tmp_path):
    """Listed by Ray tasks (the driver lists 2 entries): nine images and a video, whose 12 frames at 4 a
    second are probed and decoded from S3 in segments of 1 s."""
    monkeypatch.setattr(listing, "DRIVER_LISTING_ENTRIES", 2)
    expected = {f"parts/{folder}/img_{i}.jpg" for folder in "abc" for i in range(3)}
    for key in expected:
        s3_endpoint.put_object(Bucket=BUCKET, Key=key, Body=jpeg_bytes())
    times = write_video(tmp_path / "clip.mp4", frames=90, rate=30, gop=10)
    s3_endpoint.put_object(Bucket=BUCKET, Key="parts/b/clip.mp4", Body=(tmp_path / "clip.mp4").read_bytes())
    summary = run(compose_config([*FAST_MODEL, *VIDEOS, f"data.path=s3://{BUCKET}/parts", f"output.path=s3://{BUCKET}/out/parts",
                                  "data.video.fps=4", "data.video.segment_s=1"]))
    filesystem, path = pafs.FileSystem.from_uri(f"s3://{BUCKET}/out/parts")
    table = pads.dataset(path, filesystem=filesystem, format="parquet").to_table()
    images = table.filter(pc.is_null(table["frame_index"]))
    assert sorted(images.column("path").to_pylist()) == sorted(f"s3://{BUCKET}/{key}" for key in expected)
    frames = table.filter(pc.is_valid(table["frame_index"])).sort_by("frame_index")
    chosen = [0, 8, 15, 23, 30, 38, 45, 53, 60, 68, 75, 83]  # the first frame of each quarter second
    assert frames.column("path").to_pylist() == [f"s3://{BUCKET}/parts/b/clip.mp4"] * 12
    assert frames.column("frame_index").to_pylist() == chosen
    assert frames.column("frame_time_s").to_pylist() == [times[i] for i in chosen]
    assert frames.column("error_kind").null_count == 12
    assert (summary.inputs, summary.processed, summary.ok) == (21, 21, 21)


def test_the_lease_is_created_with_a_conditional_write(s3_endpoint):
    """Each generation's lease object is created with If-None-Match: *: a second create of the same key
    fails and leaves the first as it was; a takeover creates the next generation beside it."""
    output = resolve(f"s3://{BUCKET}/out/leased")
    key = f"out/leased/{LEASE_DIR}/0000000001.json"
    assert lease_path(output, 1) == f"{BUCKET}/{key}"
    assert create_exclusive(output, lease_path(output, 1), {"owner": "a"})
    assert not create_exclusive(output, lease_path(output, 1), {"owner": "b"})
    assert json.loads(s3_endpoint.get_object(Bucket=BUCKET, Key=key)["Body"].read()) == {"owner": "a"}
    taker = OutputLease(output, "taker", timeout_s=180, heartbeat_s=3600)
    taker.acquire()  # generation 1 has no heartbeat: stale
    taker.release()
    taken = json.loads(s3_endpoint.get_object(Bucket=BUCKET, Key=key.replace("01.json", "02.json"))["Body"].read())
    assert (taken["owner"], taken["generation"], taken["released"], taken["limits"]) == ("taker", 2, True, {"1": 0})
    assert json.loads(s3_endpoint.get_object(Bucket=BUCKET, Key=key)["Body"].read()) == {"owner": "a"}


def test_a_parquet_manifest_on_s3_lists_s3_images_once_each_even_when_reading_it_fails_at_first(s3_service):
    """A manifest naming three images, two of them twice, a missing one and a text file: its first two
    requests answered 503 (the storage client retries them), one row per image, the summary counting the
    two repeats dropped."""
    proxy, s3_endpoint = s3_service
    for i in range(3):
        s3_endpoint.put_object(Bucket=BUCKET, Key=f"listed/{i}.jpg", Body=jpeg_bytes(50 + i, 40))
    paths = [f"s3://{BUCKET}/listed/{i}.jpg" for i in (0, 1, 2, 1, 0)] + [f"s3://{BUCKET}/listed/missing.jpg", f"s3://{BUCKET}/listed/x.txt"]
    buffer = pa.BufferOutputStream()
    pq.write_table(pa.table({"path": paths}), buffer)
    s3_endpoint.put_object(Bucket=BUCKET, Key="lists/images.parquet", Body=buffer.getvalue().to_pybytes())
    proxy.rules = [Rule(SLOW_DOWN, methods=("GET", "HEAD"), key="/lists/", first=2)]
    try:
        summary = run(compose_config([*FAST_MODEL, f"data.manifest=s3://{BUCKET}/lists/images.parquet", f"output.path=s3://{BUCKET}/out/listed"]))
    finally:
        injected = sum(proxy.injected().values())
        proxy.rules = []
    filesystem, path = pafs.FileSystem.from_uri(f"s3://{BUCKET}/out/listed")
    rows = {row["path"]: row for row in pads.dataset(path, filesystem=filesystem, format="parquet").to_table().to_pylist()}
    assert {p: (row["error_kind"], row["width"]) for p, row in rows.items()} == {
        **{f"s3://{BUCKET}/listed/{i}.jpg": (None, 50 + i) for i in range(3)}, f"s3://{BUCKET}/listed/missing.jpg": ("unreadable", None)}
    assert (summary.inputs, summary.ok, summary.duplicates, injected) == (4, 3, 2, 2)


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


@pytest.fixture(scope="module")
def faulty_s3(s3_service):
    """The proxy, and IMAGES images under in/ of FAULTS_BUCKET, by URI."""
    proxy, client = s3_service
    client.create_bucket(Bucket=FAULTS_BUCKET)
    images = {f"s3://{FAULTS_BUCKET}/in/img_{i:03d}.jpg": gradient_jpeg(64, 48, i) for i in range(IMAGES)}
    for uri, data in images.items():
        client.put_object(Bucket=FAULTS_BUCKET, Key=uri.removeprefix(f"s3://{FAULTS_BUCKET}/"), Body=data)
    return proxy, images


def overrides(output: str, *more: str) -> list[str]:
    return [*FAST_MODEL, f"data.path=s3://{FAULTS_BUCKET}/in", f"output.path=s3://{FAULTS_BUCKET}/{output}", *more]


def committed(output: str) -> dict[str, dict]:
    location = resolve(f"s3://{FAULTS_BUCKET}/{output}")
    files = [info.path for info in location.filesystem.get_file_info(pafs.FileSelector(location.path))
             if info.base_name.startswith("part-")]
    rows = [row for path in files for row in pq.read_table(path, filesystem=location.filesystem).to_pylist()]
    by_path = {row["path"]: row for row in rows}
    assert len(by_path) == len(rows), "a path has two rows"
    return by_path


def read_manifest(output: str) -> dict:
    location = resolve(f"s3://{FAULTS_BUCKET}/{output}")
    with location.filesystem.open_input_stream(location.join(MANIFEST_NAME)) as stream:
        return json.loads(stream.read())


def test_one_get_in_ten_failing_transiently_costs_retries_not_rows(faulty_s3):
    """10% of the images' GETs answered 503 SlowDown or 500 InternalError (by a seeded draw): every
    image ends with its detections, no row is an error, and the summary and the manifest count exactly
    one retry per injected fault (pyarrow tries each image read once; app.retry retries)."""
    proxy, images = faulty_s3
    proxy.rules = [Rule(SLOW_DOWN, key=r"/in/img_.*\.jpg$", fraction=0.05, seed=1),
                   Rule(INTERNAL_ERROR, key=r"/in/img_.*\.jpg$", fraction=0.05 / 0.95, seed=2)]
    try:
        summary = run(compose_config(overrides("out/ten-percent")))
    finally:
        injected = proxy.injected()
        proxy.rules = []
    assert sum(injected.values()) >= 2, injected  # the draw did inject faults (both kinds, by its seeds)
    assert (summary.inputs, summary.ok, summary.errors, summary.transient) == (IMAGES, IMAGES, 0, 0)
    assert summary.read_retries == sum(injected.values())
    assert read_manifest("out/ten-percent")["read_retries_by_last_run"] == summary.read_retries
    rows = committed("out/ten-percent")
    assert_detections(rows, model_detections(compose_config(overrides("out/ten-percent")), images, images.get))


def test_three_images_failing_every_get_are_left_for_a_rerun_which_reads_exactly_them(faulty_s3):
    """Every GET of three images answered 503 SlowDown: after 3 attempts each (2 retries) they are left
    unread, without a row, listed in _transient.parquet; the other 37 are committed, and the dataset is not
    complete (no manifest). Once the fault clears, a plain rerun processes exactly those three."""
    proxy, images = faulty_s3
    chosen = [f"in/img_{i:03d}.jpg" for i in (5, 20, 33)]
    proxy.rules = [Rule(SLOW_DOWN, key="|".join(f"/{FAULTS_BUCKET}/{key}$" for key in chosen))]
    cfg = compose_config(overrides("out/forever", "data.read_attempts=3"))
    try:
        with pytest.raises(InputsLeft) as caught:
            run(cfg)
    finally:
        injected = proxy.injected()
        proxy.rules = []
    uris = [f"s3://{FAULTS_BUCKET}/{key}" for key in chosen]
    assert dict(injected) == {f"/{FAULTS_BUCKET}/{key}": 3 for key in chosen}
    summary = caught.value.summary
    assert (summary.inputs, summary.ok, summary.errors, summary.transient, summary.read_retries) == (IMAGES, 37, 0, 3, 6)
    assert str(caught.value) == (
        f"3 of {IMAGES} inputs were not read: storage kept failing for reasons that may pass, after 3 attempts each "
        f"(listed in s3://{FAULTS_BUCKET}/out/forever/{TRANSIENT_NAME}); rerun to read them")
    rows = committed("out/forever")
    assert sorted(rows) == sorted(set(images) - set(uris))
    location = resolve(f"s3://{FAULTS_BUCKET}/out/forever")
    left = pq.read_table(location.join(TRANSIENT_NAME), filesystem=location.filesystem).to_pylist()
    assert [row["path"] for row in sorted(left, key=lambda row: row["path"])] == uris
    assert all(row["error"].startswith("still failing after 3 attempts: AWS Error") for row in left)
    assert location.filesystem.get_file_info(location.join(MANIFEST_NAME)).type == pafs.FileType.NotFound

    again = run(cfg)
    assert (again.inputs, again.processed, again.ok, again.transient, again.read_retries) == (IMAGES, 3, IMAGES, 0, 0)
    rows = committed("out/forever")
    assert len(rows) == IMAGES
    assert_detections(rows, model_detections(cfg, images, images.get))
    assert location.filesystem.get_file_info(location.join(TRANSIENT_NAME)).type == pafs.FileType.NotFound
    assert read_manifest("out/forever")["counts"]["inputs"] == IMAGES


def test_a_run_whose_retry_budget_is_spent_stops_with_its_rows_committed_and_a_rerun_finishes(faulty_s3):
    """A budget of 2 retries for the run, and one image failing every GET: its third attempt finds the
    budget spent, the run stops with one line (exit code 9 from the command line) and commits the rows
    that reached the driver before (how many depends on the stages' timing), never that image's; what a
    rerun then does is the test above's."""
    proxy, images = faulty_s3
    proxy.rules = [Rule(SLOW_DOWN, key=rf"/{FAULTS_BUCKET}/in/img_007\.jpg$")]
    cfg = compose_config(overrides("out/budget", "data.read_attempts=5", "data.read_retry_budget=2"))
    try:
        with pytest.raises(InputsLeft) as caught:
            run(cfg)
    finally:
        proxy.rules = []
    assert str(caught.value).startswith(
        "the run's read retries (data.read_retry_budget) are spent: storage keeps failing (OSError: AWS Error")
    assert str(caught.value).endswith("; rerun later to go on where this run stopped")
    before = committed("out/budget")
    assert len(before) < IMAGES and f"s3://{FAULTS_BUCKET}/in/img_007.jpg" not in before
    assert all(row["error_kind"] is None for row in before.values())


def test_a_denied_key_named_like_a_throttling_answer_is_one_unreadable_row_and_never_retried(s3_service):
    """One object denied on its own (a private object) while its neighbours read fine: an unreadable row
    with S3's answer. Its key reads like a throttling answer; the verdict comes from the error code, so it
    is not retried, neither in the run nor by the next one."""
    proxy, client = s3_service
    odd = "deny/SlowDown Throttl HTTP status 503 AWS Error SLOW_DOWN during GetObject operation.jpg"
    for key in ("deny/a.jpg", "deny/b.jpg", odd):
        client.put_object(Bucket=BUCKET, Key=key, Body=jpeg_bytes(40, 30))
    proxy.rules = [Rule(ACCESS_DENIED, methods=("GET", "HEAD"), key="/deny/SlowDown")]
    cfg = compose_config([*FAST_MODEL, f"data.path=s3://{BUCKET}/deny", f"output.path=s3://{BUCKET}/out/deny"])
    try:
        summary = run(cfg)
        again = run(cfg)
    finally:
        injected = proxy.injected()
        proxy.rules = []
    assert (summary.inputs, summary.ok, summary.errors_by_kind, summary.read_retries) == (3, 2, {"unreadable": 1}, 0)
    assert (again.processed, again.read_retries, sum(injected.values())) == (0, 0, 1)
    filesystem, path = pafs.FileSystem.from_uri(f"s3://{BUCKET}/out/deny")
    rows = {row["path"]: row for row in pads.dataset(path, filesystem=filesystem, format="parquet").to_table().to_pylist()}
    assert rows[f"s3://{BUCKET}/{odd}"]["error"].endswith("AWS Error ACCESS_DENIED during HeadObject operation: No response body.")


def test_a_credential_revoked_mid_run_stops_the_run_without_a_verdict_and_the_rerun_finishes(faulty_s3):
    """Every request answered 403 AccessDenied once twelve images were read (a rotated Secret, an expired
    token): the command line stops with exit code 11 and a line naming the cause and never the secret;
    no error row is committed, whatever the run could not read. With access back, a rerun gives every
    image the model's detections."""
    proxy, images = faulty_s3
    proxy.rules = [Rule(ACCESS_DENIED, methods=("GET", "HEAD", "PUT", "POST", "DELETE"), after=24, after_key="/in/img_")]
    command = [sys.executable, "-m", "app", *overrides("out/revoked"), f"ray.address={ray.get_runtime_context().gcs_address}"]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    finally:
        injected = proxy.injected()
        proxy.rules = []
    assert result.returncode == 11, result.stderr[-3000:]
    assert re.fullmatch(
        r"ray-detect: storage refused: storage refused \d+ reads \(AWS Error ACCESS_DENIED during HeadObject "
        rf"operation\), and (s3://{FAULTS_BUCKET}/in/img_\d{{3}}\.jpg, read fine by this run|s3://{FAULTS_BUCKET}, where "
        r"they are), is refused too \(AWS Error ACCESS_DENIED during Head(Object|Bucket) operation\): no row was committed for "
        r"them; restore access and rerun", result.stderr.splitlines()[-1]), result.stderr[-3000:]
    assert SECRET_KEY not in result.stdout + result.stderr and sum(injected.values()) > 10
    assert [row for row in committed("out/revoked").values() if row["error_kind"] is not None] == []

    cfg = compose_config(overrides("out/revoked"))
    again = run(cfg)
    assert (again.inputs, again.ok, again.errors) == (IMAGES, IMAGES, 0)
    assert_detections(committed("out/revoked"), model_detections(cfg, images, images.get))


def test_faults_on_listing_heads_gets_commits_and_lease_renewals_cost_retries_not_rows(faulty_s3):
    """The first HEAD of every key reset; the first GET of every image, of the listing and of each lease
    document answered 503 SlowDown; one GET in twenty slowed by half a second; the first PUT of the lease's
    creation, of each of its renewals and of every committed file answered 503. Each is retried, by the
    app (image reads, the lease's reads) or by the storage clients (the rest), and the run ends with every
    image's detections. Meanwhile the run's retry budget, which every image's retries ask, has its actor
    killed once the first rows reach the driver: Ray restarts it (its count starts again) and retries the
    calls that waited on it, so no read becomes an error row or is left."""
    proxy, images = faulty_s3
    killed = []

    def kill_the_budget(rows):
        if not killed:
            (named,) = [actor for actor in ray.util.list_named_actors(all_namespaces=True)
                        if actor["name"].startswith("ray-detect-retry-budget-")]
            ray.kill(ray.get_actor(named["name"], namespace=named["namespace"]), no_restart=False)
            killed.append(named["name"])

    proxy.rules = [Rule(RESET, methods=("HEAD",), first=1),
                   Rule(SLOW_DOWN, methods=("GET",), key=rf"/in/img_\d+\.jpg$|^/{FAULTS_BUCKET}/?$|/_lease/\d+\.json$", first=1),
                   Rule(DELAY, methods=("GET",), fraction=0.05, delay_s=0.5, seed=3),
                   Rule(SLOW_DOWN, methods=("PUT",), key=r"/_lease/\d+\.json$", every=2),
                   Rule(SLOW_DOWN, methods=("PUT",), key="/part-", first=1)]
    cfg = compose_config(overrides("out/requests", "output.rows_per_file=8", "output.lease_heartbeat_s=0.5",
                                   "output.lease_timeout_s=30"))
    try:
        summary = run(cfg, on_rows=kill_the_budget)
    finally:
        faulted = {rule.fault + " " + "/".join(rule.methods): sum(rule.injected.values()) for rule in proxy.rules}
        proxy.rules = []
    assert (summary.inputs, summary.ok, summary.errors, summary.transient) == (IMAGES, IMAGES, 0, 0)
    # The retries add up across the budget's restart (the actor's own count starts again), less what the
    # killed actor counted after the driver last asked (every 2 s).
    assert len(killed) == 1 and summary.read_retries > 0
    assert faulted["reset HEAD"] >= IMAGES and faulted["SlowDown GET"] >= IMAGES + 2  # images, listing, lease
    assert faulted["SlowDown PUT"] >= 2 + IMAGES // 8  # the lease's creation and renewals, each committed file once
    assert_detections(committed("out/requests"), model_detections(cfg, images, images.get))
