"""One run at a time on an output.path (app.output.lease): a live run's lease refuses a second run, a stale one is
taken over, and a run whose lease was taken stops before committing more."""

import json
import subprocess
import sys
import time

import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pytest

from app.output.lease import (
    LEASE_NAME,
    LeaseLost,
    OutputInUse,
    OutputLease,
    create_exclusive,
)
from app.pipeline import run
from app.storage import resolve
from tests.conftest import FAST_MODEL, compose_config, write_images


def test_a_second_run_on_a_live_output_is_refused_and_the_first_completes(local_ray, tmp_path):
    """The second run, in this process, is refused as soon as the first (the command line, attached to
    this process's Ray) has taken the lease: the first holds it from before it connects to Ray until its
    last commit, seconds later, however few its images."""
    paths = write_images(tmp_path / "in", 4)
    address = local_ray.get_runtime_context().gcs_address
    overrides = [*FAST_MODEL, f"data.path={tmp_path / 'in'}", f"output.path={tmp_path / 'out'}", f"ray.address={address}"]
    first = subprocess.Popen([sys.executable, "-m", "app", *overrides], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while not (tmp_path / "out" / LEASE_NAME).exists():
        assert time.monotonic() < deadline and first.poll() is None
        time.sleep(0.1)
    holder = json.loads((tmp_path / "out" / LEASE_NAME).read_text())
    with pytest.raises(OutputInUse, match=rf"^output.path {tmp_path / 'out'} is in use by run {holder['owner']} on "
                                          rf"{holder['host']} \(pid {first.pid}\), whose last heartbeat was \d+ s ago; "
                                          r"a lease is stale after output.lease_timeout_s=180$"):
        run(compose_config(overrides))
    output, _ = first.communicate(timeout=300)
    assert first.returncode == 0, output
    table = pads.dataset(str(tmp_path / "out"), format="parquet").to_table()
    assert sorted(table.column("path").to_pylist()) == sorted(str(path) for path in paths)
    assert table.column("num_detections").to_pylist() == [3] * len(paths)
    assert not (tmp_path / "out" / LEASE_NAME).exists()  # released at the end


def test_the_command_line_says_why_and_exits_5(tmp_path):
    write_images(tmp_path / "in", 1)
    (tmp_path / "out").mkdir()
    lease = {"owner": "run-elsewhere", "host": "other-pod", "pid": 7, "heartbeat": time.time()}
    (tmp_path / "out" / LEASE_NAME).write_text(json.dumps(lease))
    result = subprocess.run([sys.executable, "-m", "app", *FAST_MODEL, f"data.path={tmp_path / 'in'}", f"output.path={tmp_path / 'out'}"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 5
    assert result.stderr.strip().splitlines()[-1].startswith(
        f"ray-detect: output in use: output.path {tmp_path / 'out'} is in use by run run-elsewhere on other-pod (pid 7)")


def test_a_scheduled_run_that_finds_the_output_in_use_skips_with_exit_code_0(tmp_path):
    """output.skip_if_in_use (which the chart sets for a schedule): the run behind a live one says so in
    one line and succeeds, touching nothing."""
    write_images(tmp_path / "in", 1)
    (tmp_path / "out").mkdir()
    lease = {"owner": "last-night", "host": "head-pod", "pid": 7, "heartbeat": time.time()}
    (tmp_path / "out" / LEASE_NAME).write_text(json.dumps(lease))
    result = subprocess.run([sys.executable, "-m", "app", *FAST_MODEL, f"data.path={tmp_path / 'in'}", f"output.path={tmp_path / 'out'}",
                             "output.skip_if_in_use=true"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1].startswith(
        f"ray-detect: skipped, output.skip_if_in_use=true: output.path {tmp_path / 'out'} is in use by run last-night on head-pod (pid 7)")
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == [LEASE_NAME]


def test_a_stale_lease_is_taken_over(local_ray, tmp_path, caplog):
    write_images(tmp_path / "in", 2)
    (tmp_path / "out").mkdir()
    lease = {"owner": "dead-run", "host": "other-pod", "pid": 7, "heartbeat": time.time() - 3600}
    (tmp_path / "out" / LEASE_NAME).write_text(json.dumps(lease))
    summary = run(compose_config([*FAST_MODEL, f"data.path={tmp_path / 'in'}", f"output.path={tmp_path / 'out'}"]))
    assert (summary.inputs, summary.processed) == (2, 2)
    assert "taking over output.path from run dead-run on other-pod (pid 7), silent for 3600 s" in caplog.text
    assert not (tmp_path / "out" / LEASE_NAME).exists()


def wait_until(condition, deadline_s: float = 60) -> None:
    """Polls condition until it holds; the deadline is generous, only there to fail a hung heartbeat thread."""
    deadline = time.monotonic() + deadline_s
    while not condition():
        assert time.monotonic() < deadline, "the lease's heartbeat thread did not act in time"
        time.sleep(0.01)


def test_a_run_whose_lease_was_taken_over_stops(tmp_path):
    output = resolve(str(tmp_path / "out"))
    lease = OutputLease(output, "slow-run", timeout_s=1.0, heartbeat_s=0.05)
    lease.acquire()
    lease.check()  # still ours
    (tmp_path / "out" / LEASE_NAME).write_text(json.dumps({"owner": "new-run", "host": "other-pod", "pid": 9, "heartbeat": time.time()}))
    wait_until(lambda: lease.lost)  # the heartbeat thread notices
    with pytest.raises(LeaseLost, match="^run new-run on other-pod took output.path over$"):
        lease.check()
    lease.release()
    assert json.loads((tmp_path / "out" / LEASE_NAME).read_text())["owner"] == "new-run"  # not ours to delete


def test_a_real_run_whose_lease_is_taken_over_commits_nothing_more(local_ray, tmp_path):
    """The job itself (not a stand-in): once its first file is committed, another run takes the lease over
    (writes _lease.json as a run taking over a stale lease does). The run stops at its next commit with
    LeaseLost, having committed nothing after the takeover, and leaves the new holder's lease in place."""
    write_images(tmp_path / "in", 40)
    out = tmp_path / "out"
    cfg = compose_config([*FAST_MODEL, f"data.path={tmp_path / 'in'}", f"output.path={out}", "output.commit_interval_s=0",
                          "inference.batch_size=2"])
    before_takeover: list[str] = []

    def take_over(rows):
        if not before_takeover:
            before_takeover.extend(sorted(path.name for path in out.glob("part-*.parquet")))
            (out / LEASE_NAME).write_text(json.dumps({"owner": "new-run", "host": "other-pod", "pid": 9, "heartbeat": time.time()}))

    with pytest.raises(LeaseLost, match="^run new-run on other-pod took output.path over$"):
        run(cfg, on_rows=take_over)
    assert len(before_takeover) == 1
    assert sorted(path.name for path in out.glob("part-*.parquet")) == before_takeover
    assert json.loads((out / LEASE_NAME).read_text())["owner"] == "new-run"


def test_the_local_create_is_exclusive(tmp_path):
    output = resolve(str(tmp_path))
    assert create_exclusive(output, str(tmp_path / LEASE_NAME), {"owner": "a"})
    assert not create_exclusive(output, str(tmp_path / LEASE_NAME), {"owner": "b"})
    assert json.loads((tmp_path / LEASE_NAME).read_text()) == {"owner": "a"}
    assert isinstance(output.filesystem, pafs.LocalFileSystem)


def test_a_run_may_wait_for_a_dead_runs_lease_to_go_stale(tmp_path):
    """A retried job whose driver died on another machine: its lease stops beating and goes stale. The time bound
    stays: how long the run waits (until the heartbeat is timeout_s old, not wait_s) is what this test proves;
    heartbeats are wall-clock times in a shared file, so the lease reads the real clock. The upper bound (3 s for
    about 1 s of waiting) leaves room for a busy machine."""
    (tmp_path / "out").mkdir()
    dead = {"owner": "dead-run", "host": "other-pod", "pid": 7, "heartbeat": time.time() - 0.5}
    (tmp_path / "out" / LEASE_NAME).write_text(json.dumps(dead))
    output = resolve(str(tmp_path / "out"))
    with pytest.raises(OutputInUse, match="in use by run dead-run on other-pod"):
        OutputLease(output, "impatient", timeout_s=1.5, heartbeat_s=0.1, wait_s=0.2).acquire()
    started = time.monotonic()
    lease = OutputLease(output, "retry", timeout_s=1.5, heartbeat_s=0.1, wait_s=5)
    lease.acquire()
    assert 0.5 < time.monotonic() - started < 3  # it waited for the heartbeat to be 1.5 s old, no longer
    assert json.loads((tmp_path / "out" / LEASE_NAME).read_text())["owner"] == "retry"
    lease.release()
    assert not (tmp_path / "out" / LEASE_NAME).exists()


def test_a_heartbeat_that_fails_is_tried_again(tmp_path, caplog):
    """The store fails one heartbeat (the lease file unreadable for a moment): the run keeps its lease."""
    output = resolve(str(tmp_path / "out"))
    lease = OutputLease(output, "steady-run", timeout_s=1.0, heartbeat_s=0.05)
    lease.acquire()
    good = (tmp_path / "out" / LEASE_NAME).read_text()
    (tmp_path / "out" / LEASE_NAME).write_text("{not json")
    wait_until(lambda: "could not renew the lease on output.path: " in caplog.text)
    (tmp_path / "out" / LEASE_NAME).write_text(good)
    renewed = lease.heartbeats
    wait_until(lambda: lease.heartbeats > renewed)
    lease.check()
    assert json.loads((tmp_path / "out" / LEASE_NAME).read_text())["heartbeat"] > json.loads(good)["heartbeat"]
    lease.release()
