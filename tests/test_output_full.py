"""A full output volume: output.path on a real small filesystem (a tmpfs of 64 KiB this test mounts) that
fills mid-run. The run stops with OutputFull (exit code 10 from the command line, tests/test_cli.py) and
one line naming the file, the bytes it needed and those free; every committed file is whole, nothing
half-written is left, and after the volume grows a rerun completes with one row per input.

Mounting needs root, or sudo without a password (the GitHub workflow's runner, where a skip fails the run:
RAY_DETECT_REQUIRE_PRIVILEGED_TESTS=1); elsewhere the test skips, and pytest's summary says so in a line of
its own (tests/conftest.py)."""

import json
import os
import re
import shutil
import subprocess

import pyarrow.parquet as pq
import pytest

from app.output.dataset import LEASE_DIR, MANIFEST_NAME, STAGING_DIR, OutputFull
from app.pipeline import run
from app.config import compose_config
from tests.support.images import write_images
from tests.support.models import FAST_MODEL, assert_detections, model_detections

IMAGES = 40
pytestmark = [pytest.mark.privileged, pytest.mark.slow]


@pytest.fixture
def small_volume(tmp_path):
    """A tmpfs of 64 KiB mounted at tmp_path/out (writable by all, as tmpfs is by default), and a function
    that resizes it."""
    if os.geteuid() == 0:
        as_root = []
    elif shutil.which("sudo") and subprocess.run(["sudo", "-n", "true"], capture_output=True).returncode == 0:
        as_root = ["sudo", "-n"]
    else:
        pytest.skip("mounting a tmpfs needs root or sudo without a password")
    mount_point = tmp_path / "out"
    mount_point.mkdir()
    mounted = subprocess.run([*as_root, "mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        first_line = mounted.stderr.partition("\n")[0]
        pytest.skip(f"mounting a tmpfs needs the capability CAP_SYS_ADMIN: {first_line}")

    def resize(size: str) -> None:
        subprocess.run([*as_root, "mount", "-o", f"remount,size={size}", str(mount_point)], check=True)

    yield mount_point, resize
    subprocess.run([*as_root, "umount", "-l", str(mount_point)], check=False)


def test_a_full_output_volume_stops_the_run_cleanly_and_a_rerun_finishes(small_volume, tmp_path, local_ray):
    out, resize = small_volume
    paths = write_images(tmp_path / "in", IMAGES)
    overrides = [*FAST_MODEL, f"data.path={tmp_path / 'in'}", f"output.path={out}", "output.rows_per_file=2",
                 "output.commit_interval_s=0", "inference.batch_size=2"]
    cfg = compose_config(overrides)
    with pytest.raises(OutputFull) as caught:  # exit code 10 from the command line (test_cli)
        run(cfg)
    pattern = (rf"no space left on the filesystem of {re.escape(str(out / STAGING_DIR))}/\w+: "
               r"part-\w+-\d{6}\.parquet needs \d+ bytes, \d+ free; free some space \(or choose another output\.path\) "
               r"and rerun: the rows committed so far are kept")
    assert re.fullmatch(pattern, str(caught.value)), str(caught.value)
    needed, free = map(int, re.search(r"needs (\d+) bytes, (\d+) free", str(caught.value)).groups())
    assert needed > free

    committed = sorted(out.glob("part-*.parquet"))
    rows = [row for path in committed for row in pq.read_table(path).to_pylist()]  # every committed file is whole
    assert 0 < len(rows) < IMAGES and len({row["path"] for row in rows}) == len(rows)
    assert [path.name for path in (out / STAGING_DIR).rglob("*") if path.is_file()] == []
    assert not (out / MANIFEST_NAME).exists()
    assert sorted(path.name for path in (out / LEASE_DIR).glob("*.json")) == ["0000000001.json"]  # released if it fitted
    assert not list(out.glob("*.partial"))

    resize("4m")
    summary = run(cfg)
    assert (summary.inputs, summary.ok, summary.processed) == (IMAGES, IMAGES, IMAGES - len(rows))
    final = {row["path"]: row for path in out.glob("part-*.parquet") for row in pq.read_table(path).to_pylist()}
    assert sorted(final) == sorted(str(path) for path in paths)
    assert_detections(final, model_detections(cfg, paths))
    assert (out / MANIFEST_NAME).exists()
    latest = json.loads((out / LEASE_DIR / "0000000002.json").read_text())
    assert (latest["generation"], latest["released"]) == (2, True)
