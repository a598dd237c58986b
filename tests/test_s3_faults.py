"""Runs against S3 that fails the way S3 and networks do: moto's S3 server on loopback behind the
fault-injecting proxy of app/s3_faults.py, which answers chosen GETs of images with 503 SlowDown or 500
InternalError. A fault that may pass is retried and never becomes a committed
verdict on the image; a file that keeps failing has no row, and a rerun reads it. (Resets and timeouts
are classified in tests/test_retry.py, from the errors pyarrow raised through the proxy.)"""


import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import ray

from app.output.dataset import MANIFEST_NAME, TRANSIENT_NAME
from app.pipeline import InputsLeft, run
from app.storage import resolve
from tests.conftest import FAST_MODEL, assert_detections, compose_config, gradient_jpeg, model_detections
from app.s3_faults import INTERNAL_ERROR, SLOW_DOWN, Rule, moto_behind_proxy

BUCKET = "faults-test"
IMAGES = 40


@pytest.fixture(scope="module")
def s3():
    """moto's server, the proxy in front of it (the endpoint every client here and in Ray's workers uses),
    and IMAGES images under in/."""
    with moto_behind_proxy(BUCKET) as (proxy, client):
        images = {f"s3://{BUCKET}/in/img_{i:03d}.jpg": gradient_jpeg(64, 48, i) for i in range(IMAGES)}
        for uri, data in images.items():
            client.put_object(Bucket=BUCKET, Key=uri.removeprefix(f"s3://{BUCKET}/"), Body=data)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=300 * 1024**2)
        try:
            yield proxy, images
        finally:
            ray.shutdown()


def overrides(output: str, *more: str) -> list[str]:
    return [*FAST_MODEL, f"data.path=s3://{BUCKET}/in", f"output.path=s3://{BUCKET}/{output}", *more]


def committed(output: str) -> dict[str, dict]:
    location = resolve(f"s3://{BUCKET}/{output}")
    files = [info.path for info in location.filesystem.get_file_info(pafs.FileSelector(location.path))
             if info.base_name.startswith("part-")]
    rows = [row for path in files for row in pq.read_table(path, filesystem=location.filesystem).to_pylist()]
    by_path = {row["path"]: row for row in rows}
    assert len(by_path) == len(rows), "a path has two rows"
    return by_path


def read_manifest(output: str) -> dict:
    import json

    location = resolve(f"s3://{BUCKET}/{output}")
    with location.filesystem.open_input_stream(location.join(MANIFEST_NAME)) as stream:
        return json.loads(stream.read())


def test_one_get_in_ten_failing_transiently_costs_retries_not_rows(s3):
    """10% of the images' GETs answered 503 SlowDown or 500 InternalError (by a seeded draw): every
    image ends with its detections, no row is an error, and the summary and the manifest count exactly
    one retry per injected fault (pyarrow tries each image read once; app.retry retries)."""
    proxy, images = s3
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


def test_three_images_failing_every_get_are_left_for_a_rerun_which_reads_exactly_them(s3):
    """Every GET of three images answered 503 SlowDown: after 3 attempts each (2 retries) they are left
    unread, without a row, listed in _transient.parquet; the other 37 are committed, and the dataset is not
    complete (no manifest). Once the fault clears, a plain rerun processes exactly those three."""
    proxy, images = s3
    chosen = [f"in/img_{i:03d}.jpg" for i in (5, 20, 33)]
    proxy.rules = [Rule(SLOW_DOWN, key="|".join(f"/{BUCKET}/{key}$" for key in chosen))]
    cfg = compose_config(overrides("out/forever", "data.read_attempts=3"))
    try:
        with pytest.raises(InputsLeft) as caught:
            run(cfg)
    finally:
        injected = proxy.injected()
        proxy.rules = []
    uris = [f"s3://{BUCKET}/{key}" for key in chosen]
    assert dict(injected) == {f"/{BUCKET}/{key}": 3 for key in chosen}
    summary = caught.value.summary
    assert (summary.inputs, summary.ok, summary.errors, summary.transient, summary.read_retries) == (IMAGES, 37, 0, 3, 6)
    assert str(caught.value) == (
        f"3 of {IMAGES} inputs were not read: storage kept failing for reasons that may pass, after 3 attempts each "
        f"(listed in s3://{BUCKET}/out/forever/{TRANSIENT_NAME}); rerun to read them")
    rows = committed("out/forever")
    assert sorted(rows) == sorted(set(images) - set(uris))
    location = resolve(f"s3://{BUCKET}/out/forever")
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


def test_a_run_whose_retry_budget_is_spent_stops_with_its_rows_committed_and_a_rerun_finishes(s3):
    """A budget of 2 retries for the run, and one image failing every GET: its third attempt finds the
    budget spent, the run stops with one line (exit code 9 from the command line) and commits the rows
    that reached the driver before (how many depends on the stages' timing), never that image's; what a
    rerun then does is the test above's."""
    proxy, images = s3
    proxy.rules = [Rule(SLOW_DOWN, key=rf"/{BUCKET}/in/img_007\.jpg$")]
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
    assert len(before) < IMAGES and f"s3://{BUCKET}/in/img_007.jpg" not in before
    assert all(row["error_kind"] is None for row in before.values())
