"""The log is the interface: the job's output read as a RayJob's user reads it (stdout and stderr captured,
not a terminal), on a local Ray the job starts (here) and on a multi-node cluster it attaches to
(tests/test_placement.py, with the cluster's placement)."""

import os
import re
import shutil
import tempfile

import pyarrow.parquet as pq
import pytest
from tests.support.images import write_images, write_mixed_inputs
from tests.support.jobs import IMAGES, check_clean_log, run_job
from tests.support.ports import free_port

pytestmark = pytest.mark.slow  # each test runs a job that starts Ray


def test_a_clean_run_on_a_local_ray_logs_progress_and_summary_and_nothing_alarming(tmp_path):
    """The command on a new folder. (Run again, it finds every row written: the resume tests run that case,
    and test_cli's summary tests the lines it prints.) The machine's Ray directory names a cluster that is
    gone, as a killed `ray start` leaves it: the run starts its own Ray all the same (ray.address=null)."""
    write_images(tmp_path / "in", IMAGES)
    ray_tmp = tempfile.mkdtemp(prefix="rd-")  # short: Ray's socket paths under it must fit in 107 bytes
    try:
        os.makedirs(f"{ray_tmp}/ray")
        with open(f"{ray_tmp}/ray/ray_current_cluster", "w") as address_file:
            address_file.write(f"127.0.0.1:{free_port()}")
        result = run_job(tmp_path, "ray.num_cpus=2", env={"RAY_TMPDIR": ray_tmp})
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    check_clean_log(result, ["INFO worker.py", "Started a local Ray instance."])
    assert re.search(r"^ray-detect: detector actors used: 2, on 1 node\(s\), holding 0 GPU\(s\); devices: cpu x2; "
                     r"at most at once: cpu [12]$", result.stdout, re.MULTILINE)
    assert f"; {IMAGES} processed by this run in " in result.stdout
    assert f"ray-detect: results in {tmp_path / 'out'} (manifest: {tmp_path / 'out'}/_manifest.json)" in result.stdout
    assert pq.read_table(tmp_path / "out").num_rows == IMAGES
    assert sorted(os.listdir(tmp_path)) == ["in", "out"]  # Hydra wrote nothing of its own


def test_broken_files_show_in_progress_and_summary_and_too_many_exit_3(tmp_path):
    """Seven of the twenty inputs fail, over data.max_error_fraction=0.2: a warning says so once, as soon
    as it is certain; every row is still written, and the command exits with code 3. (One detector actor:
    the clean run above has the two of auto.)"""
    kinds = write_mixed_inputs(tmp_path / "in")
    result = run_job(tmp_path, "ray.num_cpus=2", "inference.num_actors=1", "data.max_file_bytes=200000",
                     "data.max_image_pixels=4000000", "data.max_error_fraction=0.2")
    total, failed = len(kinds), sum(kind is not None for kind in kinds.values())
    assert (total, failed, result.returncode) == (20, 7, 3), result.stderr[-3000:]
    errors = "corrupt_image=2, empty_file=1, not_an_image=2, too_large=1, too_many_pixels=1"
    progress = [line for line in result.stdout.splitlines() if line.startswith("progress: ")]
    assert progress[-1].startswith("progress: 20 of 20 images (100.0%), ")
    assert progress[-1].endswith(f" images/s, done, errors: 7 ({errors})")
    assert f"ray-detect: 20 images (13 ok, 7 errors: {errors}), " in result.stdout
    warnings = [line for line in result.stdout.splitlines() if "over data.max_error_fraction" in line]
    assert len(warnings) == 1 and re.fullmatch(
        r"[5-7] images failed so far, over data.max_error_fraction=0.2 of 20: the run will end with exit code 3 "
        r"once every row is written", warnings[0]), warnings  # 5 is the first count over 4; rows come in blocks
    assert result.stderr.splitlines()[-1] == "ray-detect: failed: 7 of 20 images failed, over data.max_error_fraction=0.2"
    assert len(pq.read_table(tmp_path / "out").column("path")) == 20
