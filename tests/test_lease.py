"""One run at a time on an output.path (app.output.lease): a live run's lease refuses a second run, a stale one is
taken over with the next generation, and a run whose lease was taken stops before committing more; what it moves
into place after the takeover anyway is fenced off (app.output.dataset.committed_files)."""

import errno
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pytest

from app.output import lease as lease_module
from app.output.dataset import (
    LEASE_DIR,
    MANIFEST_NAME,
    committed_files,
    json_bytes,
    latest_readable_lease,
    lease_files,
    part_name,
    read_committed,
    sorted_part_files,
)
from app.result_schema import RESULT_SCHEMA
from app.output.lease import (
    LeaseLost,
    OutputInUse,
    OutputLease,
    create_exclusive,
)
from app.output.writer import ResultWriter
from app.pipeline import run
from app.storage import Location, resolve
from app.config import compose_config
from tests.support.images import write_images
from tests.support.models import FAST_MODEL

HOST = "other-pod"


def lease_file(out, generation: int):
    return out / LEASE_DIR / f"{generation:010d}.json"


def plant(out, generation: int, owner: str, heartbeat: float, **more) -> dict:
    """A lease file of generation `generation`, as another run (on another machine) writes it."""
    document = {"owner": owner, "host": HOST, "pid": 7, "heartbeat": heartbeat, "generation": generation,
                "released": False, "limits": {}, **more}
    lease_file(out, generation).parent.mkdir(parents=True, exist_ok=True)
    lease_file(out, generation).write_bytes(json_bytes(document))
    return document


def leases(out) -> dict[int, dict]:
    """Every lease file's document, by generation."""
    return {int(path.stem): json.loads(path.read_text()) for path in sorted((out / LEASE_DIR).iterdir())}


def test_a_second_run_on_a_live_output_is_refused_and_the_first_completes(local_ray, tmp_path):
    """The second run, in this process, is refused as soon as the first (the command line, attached to
    this process's Ray) has taken the lease: the first holds it from before it connects to Ray until its
    last commit, seconds later, however few its images."""
    paths = write_images(tmp_path / "in", 4)
    address = local_ray.get_runtime_context().gcs_address
    overrides = [*FAST_MODEL, f"data.path={tmp_path / 'in'}", f"output.path={tmp_path / 'out'}", f"ray.address={address}"]
    first = subprocess.Popen([sys.executable, "-m", "app", *overrides], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_until(lambda: first.poll() is not None or (lease_file(tmp_path / "out", 1).exists()
                                                    and lease_file(tmp_path / "out", 1).stat().st_size > 0))
    assert first.poll() is None, "the first run ended before its lease was seen"
    holder = json.loads(lease_file(tmp_path / "out", 1).read_text())
    with pytest.raises(OutputInUse, match=rf"^output.path {tmp_path / 'out'} is in use by run {holder['owner']} on "
                                          rf"{holder['host']} \(pid {first.pid}\), whose last heartbeat was \d+ s ago; "
                                          r"a lease is stale after output.lease_timeout_s=180$"):
        run(compose_config(overrides))
    output, _ = first.communicate(timeout=300)
    assert first.returncode == 0, output
    table = pads.dataset(str(tmp_path / "out"), format="parquet").to_table()
    assert sorted(table.column("path").to_pylist()) == sorted(str(path) for path in paths)
    assert table.column("num_detections").to_pylist() == [3] * len(paths)
    documents = leases(tmp_path / "out")
    assert list(documents) == [1]  # the refused run created no lease
    assert (documents[1]["owner"], documents[1]["released"], documents[1]["limits"]) == (holder["owner"], True, {})


@pytest.mark.slow
def test_the_command_line_says_why_and_exits_5(tmp_path):
    write_images(tmp_path / "in", 1)
    plant(tmp_path / "out", 1, "run-elsewhere", time.time())
    result = subprocess.run([sys.executable, "-m", "app", *FAST_MODEL, f"data.path={tmp_path / 'in'}", f"output.path={tmp_path / 'out'}"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 5
    assert result.stderr.strip().splitlines()[-1].startswith(
        f"ray-detect: output in use: output.path {tmp_path / 'out'} is in use by run run-elsewhere on other-pod (pid 7)")


@pytest.mark.slow
def test_a_scheduled_run_that_finds_the_output_in_use_skips_with_exit_code_0(tmp_path):
    """output.skip_if_in_use (which the chart sets for a schedule): the run behind a live one says so in
    one line and succeeds, touching nothing."""
    write_images(tmp_path / "in", 1)
    planted = plant(tmp_path / "out", 1, "last-night", time.time())
    result = subprocess.run([sys.executable, "-m", "app", *FAST_MODEL, f"data.path={tmp_path / 'in'}", f"output.path={tmp_path / 'out'}",
                             "output.skip_if_in_use=true"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1].startswith(
        f"ray-detect: skipped, output.skip_if_in_use=true: output.path {tmp_path / 'out'} is in use by run last-night on other-pod (pid 7)")
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == [LEASE_DIR]
    assert leases(tmp_path / "out") == {1: planted}


def test_a_stale_lease_is_taken_over(local_ray, tmp_path, caplog):
    write_images(tmp_path / "in", 2)
    plant(tmp_path / "out", 1, "dead-run", time.time() - 3600)
    summary = run(compose_config([*FAST_MODEL, f"data.path={tmp_path / 'in'}", f"output.path={tmp_path / 'out'}"]))
    assert (summary.inputs, summary.processed) == (2, 2)
    assert "taking over output.path from run dead-run on other-pod (pid 7), silent for 3600 s" in caplog.text
    documents = leases(tmp_path / "out")
    assert (documents[1]["owner"], documents[1]["released"]) == ("dead-run", False)  # never rewritten by the taker
    assert (documents[2]["generation"], documents[2]["released"], documents[2]["limits"]) == (2, True, {"1": 0})
    assert [os.path.basename(path) for path in committed_files(resolve(str(tmp_path / "out")))] == [part_name(2, 0)]


def wait_until(condition, deadline_s: float = 60) -> None:
    """Polls condition until it holds; the deadline is generous, only there to fail a test that hangs (a heartbeat
    thread that never acts, a run that never gets going)."""
    deadline = time.monotonic() + deadline_s
    while not condition():
        assert time.monotonic() < deadline, f"still waiting after {deadline_s} s"
        time.sleep(0.01)


def test_a_run_whose_lease_was_taken_over_stops(tmp_path):
    output = resolve(str(tmp_path / "out"))
    lease = OutputLease(output, "slow-run", timeout_s=1.0, heartbeat_s=0.05)
    lease.acquire()
    lease.check()  # still ours
    taker = plant(tmp_path / "out", 2, "new-run", time.time(), limits={"1": 0})
    wait_until(lambda: lease.lost)  # the heartbeat thread notices
    with pytest.raises(LeaseLost, match="^run new-run on other-pod took output.path over$"):
        lease.check()
    lease.release()
    documents = leases(tmp_path / "out")
    assert documents[2] == taker  # not ours to touch
    assert (documents[1]["owner"], documents[1]["released"]) == ("slow-run", False)


def test_a_real_run_whose_lease_is_taken_over_commits_nothing_more(local_ray, tmp_path):
    """The job itself (not a stand-in): once its first file is committed, another run takes the lease over
    (creates generation 2, recording generation 1's limit, as a run taking over a stale lease does). The run
    stops at its next commit with LeaseLost, having committed nothing after the takeover, and leaves the new
    holder's lease as it was."""
    write_images(tmp_path / "in", 40)
    out = tmp_path / "out"
    cfg = compose_config([*FAST_MODEL, f"data.path={tmp_path / 'in'}", f"output.path={out}", "output.commit_interval_s=0",
                          "inference.batch_size=2"])
    before_takeover: list[str] = []
    taker: dict = {}

    def take_over(rows):
        if not before_takeover:
            before_takeover.extend(sorted(path.name for path in out.glob("part-*.parquet")))
            taker.update(plant(out, 2, "new-run", time.time(), limits={"1": len(before_takeover)}))

    with pytest.raises(LeaseLost, match="^run new-run on other-pod took output.path over$"):
        run(cfg, on_rows=take_over)
    assert before_takeover == [part_name(1, 0)]
    assert sorted(path.name for path in out.glob("part-*.parquet")) == before_takeover
    assert leases(out)[2] == taker
    assert leases(out)[1]["released"] is False


def test_the_local_create_is_exclusive(tmp_path):
    output = resolve(str(tmp_path))
    assert create_exclusive(output, str(tmp_path / "0000000001.json"), {"owner": "a"})
    assert not create_exclusive(output, str(tmp_path / "0000000001.json"), {"owner": "b"})
    assert json.loads((tmp_path / "0000000001.json").read_text()) == {"owner": "a"}
    assert isinstance(output.filesystem, pafs.LocalFileSystem)


def test_an_output_whose_lease_folder_was_deleted_gets_a_generation_above_its_files(tmp_path):
    """Someone deleted _lease/ by hand: the next run numbers its lease, and so its files, above every
    committed file's generation, so that it never writes over one."""
    out = tmp_path / "out"
    out.mkdir()
    (out / part_name(4, 2)).write_bytes(b"rows of generation 4")
    lease = OutputLease(resolve(str(out)), "after-cleanup", timeout_s=10, heartbeat_s=1)
    lease.acquire()
    lease.release()
    assert (lease.generation, sorted(path.name for path in (out / LEASE_DIR).iterdir())) == (5, ["0000000005.json"])


class ManualClock:
    """Stands in for the lease module's `time`: time() and monotonic() read one counter that only sleep()
    moves, by exactly the seconds asked, and every sleep is recorded. A lease that waits for another to go
    stale then waits at once, and the test knows exactly how long it waited."""

    def __init__(self, now: float = 1_000_000.0):
        self.now, self.sleeps = now, []

    def time(self) -> float:
        return self.now

    monotonic = time

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def clock(monkeypatch) -> ManualClock:
    clock = ManualClock()
    monkeypatch.setattr(lease_module, "time", clock)
    return clock


def test_a_run_may_wait_for_a_dead_runs_lease_to_go_stale(tmp_path, clock):
    """A retried job whose driver died on another machine: its lease stops beating and goes stale. The run
    waits until the heartbeat is timeout_s old, not until wait_s is spent, one heartbeat_s at a time."""
    dead = plant(tmp_path / "out", 1, "dead-run", clock.time() - 0.5)
    output = resolve(str(tmp_path / "out"))
    with pytest.raises(OutputInUse, match="in use by run dead-run on other-pod"):
        OutputLease(output, "impatient", timeout_s=1.5, heartbeat_s=0.25, wait_s=0.5).acquire()
    assert clock.sleeps == []  # stale in 1 s, after its wait_s: refused at once
    lease = OutputLease(output, "retry", timeout_s=1.5, heartbeat_s=0.25, wait_s=5)
    lease.acquire()
    assert clock.sleeps == [0.25] * 4  # until the heartbeat was 1.5 s old, no longer
    taken = leases(tmp_path / "out")[2]
    assert (lease.generation, taken["owner"], taken["heartbeat"]) == (2, "retry", dead["heartbeat"] + 1.5)
    lease.release()
    documents = leases(tmp_path / "out")
    assert (documents[1], documents[2]["released"], documents[2]["limits"]) == (dead, True, {"1": 0})


class FailingWrites:
    """The local filesystem, except that opening a file for writing raises OSError (EIO) while `failing` is
    set: a store that refuses writes for a while. A wrapper rather than a read-only folder, since the tests
    may run as root, whom file modes do not stop. Not a LocalFileSystem, so the lease is created with the
    check-write-read-back of stores without conditional writes."""

    def __init__(self):
        self.local = pafs.LocalFileSystem()
        self.failing = False

    def open_output_stream(self, path, *args, **kwargs):
        if self.failing:
            raise OSError(errno.EIO, "the store refused the write", path)
        return self.local.open_output_stream(path, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.local, name)


def test_a_heartbeat_that_fails_is_tried_again(tmp_path, caplog):
    """The store refuses the heartbeats' writes for a moment: the run keeps its lease."""
    filesystem = FailingWrites()
    lease = OutputLease(Location(filesystem, str(tmp_path / "out")), "steady-run", timeout_s=1.0, heartbeat_s=0.05)
    lease.acquire()
    good = json.loads(lease_file(tmp_path / "out", 1).read_text())
    filesystem.failing = True
    wait_until(lambda: "could not renew the lease on output.path: " in caplog.text)
    filesystem.failing = False
    renewed = lease.heartbeats
    wait_until(lambda: lease.heartbeats > renewed)
    lease.check()
    assert json.loads(lease_file(tmp_path / "out", 1).read_text())["heartbeat"] > good["heartbeat"]
    lease.release()


def rows_of(paths: list[str]) -> pa.Table:
    return pa.Table.from_pylist([dict(path=path, width=4, height=3, boxes=[], scores=[], labels=[], label_names=[],
                                      num_detections=0, num_tiles=1, error_kind=None, error=None) for path in paths],
                                schema=RESULT_SCHEMA)


class PausingMoves:
    """The local filesystem, with `before_move` called at each move: the moment between a writer's lease check
    and its commit, where a writer whose process stalls sits while another run takes its lease over."""

    def __init__(self, before_move):
        self.local = pafs.LocalFileSystem()
        self.before_move = before_move

    def move(self, source, destination):
        self.before_move()
        self.local.move(source, destination)

    def __getattr__(self, name):
        return getattr(self.local, name)


def missing(output: Location, paths: list[str]) -> list[str]:
    """What a run lists before its work: the paths without a committed row."""
    done = set(read_committed(output, ["path"]).column("path").to_pylist())
    return [path for path in paths if path not in done]


def commit(output: Location, lease: OutputLease, paths: list[str]) -> None:
    writer = ResultWriter(output, lease.generation, rows_per_file=100, commit_interval_s=3600, before_commit=lease.verify)
    writer.add(rows_of(paths))
    writer.commit()


def names(paths: list[str]) -> list[str]:
    return [os.path.basename(path) for path in paths]


@pytest.mark.parametrize("landing", range(4), ids=["before-the-takeover", "after-the-takeover", "after-the-listing",
                                                    "after-the-commit"])
def test_a_move_that_lands_after_its_lease_was_taken_over_is_fenced_off(tmp_path, landing):
    """Run A has committed img0 and img1 and stalls between its lease check and the move of its file with img2
    and img3, its heartbeats stopped; B takes A's lease over, lists what is committed and commits the rest.
    A's move lands at each point of B's work in turn, 5 times each (20 races in all): before B's takeover,
    after it, after B's listing, after B's commit. Wherever it lands, the dataset holds exactly one row per
    path: a file that lands after the takeover does not count, and B's release deletes it."""
    paths = [f"img{n}.jpg" for n in range(4)]
    for attempt in range(5):
        out = tmp_path / f"out-{landing}-{attempt}"
        output = resolve(str(out))
        a = OutputLease(output, "a", timeout_s=180, heartbeat_s=3600)  # no heartbeat during the test
        a.acquire()
        b = OutputLease(output, "b", timeout_s=0.001, heartbeat_s=3600)  # finds A's heartbeat stale at once
        todo: list[str] = []
        work_of_b = [b.acquire, lambda: todo.extend(missing(output, paths)), lambda: commit(output, b, todo)]
        moves = []

        def before_move():
            moves.append(1)
            if len(moves) == 2:  # A's second file: checked, staged, not yet in place
                for step in work_of_b[:landing]:
                    step()

        a_writer = ResultWriter(Location(PausingMoves(before_move), output.path), a.generation, rows_per_file=2,
                                commit_interval_s=3600, before_commit=a.verify)
        a_writer.add(rows_of(paths))  # two files of two rows; A's move of the second lands now
        for step in work_of_b[landing:]:
            step()

        late = 0 if landing == 0 else 1  # A's files moved in after B's takeover
        assert (a.generation, b.generation, b.limits) == (1, 2, {1: 2 - late})
        assert todo == (paths[2:] if late else [])
        assert sorted(read_committed(output, ["path"]).column("path").to_pylist()) == paths
        committed, fenced = sorted_part_files(output)
        assert names(committed) == [part_name(1, 0), part_name(1, 1) if not late else part_name(2, 0)]
        assert names(fenced) == [part_name(1, 1)] * late
        with pytest.raises(LeaseLost, match="^run b on .* took output.path over$"):
            a.verify()  # A commits nothing more
        b.release()
        assert names(sorted_part_files(output)[1]) == []  # the late file is gone: pandas reads one row per path too
        table = pads.dataset(str(out), format="parquet").to_table()
        assert sorted(table.column("path").to_pylist()) == paths
        a.release()
        assert leases(out)[1]["released"] is False  # A's lease, taken over, is not A's to mark


def test_two_runs_taking_over_one_stale_lease_never_both_win(tmp_path, monkeypatch):
    """Two runs find generation 1 stale and try to create generation 2 at the same moment (a barrier in front
    of the exclusive create sees to it), 20 times: one creates it; the other finds it there, looks again and
    is refused. Nobody deletes or rewrites a lease: generation 1 stays as its dead run left it, 2 as its
    winner wrote it."""
    create_exclusive_itself = lease_module.create_exclusive
    for attempt in range(20):
        out = tmp_path / f"out-{attempt}"
        dead = plant(out, 1, "dead-run", time.time() - 3600)
        together = threading.Barrier(2, timeout=30)

        def create_together(*args):
            together.wait()
            return create_exclusive_itself(*args)

        monkeypatch.setattr(lease_module, "create_exclusive", create_together)
        takers = {name: OutputLease(resolve(str(out)), name, timeout_s=180, heartbeat_s=3600) for name in ("x", "y")}
        outcomes: dict[str, str] = {}

        def take(name: str) -> None:
            try:
                takers[name].acquire()
                outcomes[name] = "won"
            except OutputInUse as error:
                outcomes[name] = str(error)

        threads = [threading.Thread(target=take, args=(name,)) for name in takers]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert sorted(outcomes) == ["x", "y"] and list(outcomes.values()).count("won") == 1, outcomes
        winner = next(name for name, outcome in outcomes.items() if outcome == "won")
        loser = "y" if winner == "x" else "x"
        holder = rf"(run {winner} on {re.escape(socket.gethostname())} \(pid {os.getpid()}\)|an unreadable lease \(_lease/0000000002.json\))"
        assert re.fullmatch(rf"output.path {re.escape(str(out))} is in use by {holder}, whose last heartbeat was 0 s ago; "
                            r"a lease is stale after output.lease_timeout_s=180", outcomes[loser]), outcomes[loser]
        documents = leases(out)
        assert list(documents) == [1, 2] and documents[1] == dead
        assert (documents[2]["owner"], documents[2]["generation"], documents[2]["limits"]) == (winner, 2, {"1": 0})
        takers[winner].release()
        assert (leases(out)[2]["owner"], leases(out)[2]["released"]) == (winner, True)


@pytest.mark.parametrize("content", [b"", b'{"owner": "half-wri'], ids=["empty", "cut-short"])
def test_an_unreadable_lease_is_judged_by_its_age(tmp_path, caplog, content):
    """A lease file its run could not finish writing (killed while creating it, a full disk): while it is
    younger than the timeout it counts as live, so a second run is refused (or waits), never crashes; older, it
    is taken over and the run goes on."""
    out = tmp_path / "out"
    lease_file(out, 1).parent.mkdir(parents=True)
    lease_file(out, 1).write_bytes(content)
    output = resolve(str(out))
    with pytest.raises(OutputInUse) as caught:
        OutputLease(output, "second", timeout_s=180, heartbeat_s=60).acquire()
    assert str(caught.value) == (f"output.path {out} is in use by an unreadable lease (_lease/0000000001.json), whose last "
                                 "heartbeat was 0 s ago; a lease is stale after output.lease_timeout_s=180")
    hour_ago = time.time() - 3600
    os.utime(lease_file(out, 1), (hour_ago, hour_ago))
    lease = OutputLease(output, "next", timeout_s=180, heartbeat_s=60)
    lease.acquire()
    assert "taking over output.path from an unreadable lease (_lease/0000000001.json), silent for 3600 s" in caplog.text
    commit(output, lease, missing(output, ["img0.jpg"]))
    lease.release()
    assert lease_file(out, 1).read_bytes() == content
    taken = json.loads(lease_file(out, 2).read_text())
    assert (taken["owner"], taken["generation"], taken["released"], taken["limits"]) == ("next", 2, True, {"1": 0})
    assert read_committed(output, ["path"]).column("path").to_pylist() == ["img0.jpg"]


def test_a_run_may_wait_for_an_unreadable_lease_to_go_stale(tmp_path, clock):
    out = tmp_path / "out"
    lease_file(out, 1).parent.mkdir(parents=True)
    lease_file(out, 1).write_bytes(b"")
    os.utime(lease_file(out, 1), (clock.time(), clock.time()))  # written now, by the lease's clock
    lease = OutputLease(resolve(str(out)), "patient", timeout_s=0.5, heartbeat_s=0.125, wait_s=5)
    lease.acquire()
    assert clock.sleeps == [0.125] * 4  # until the file was 0.5 s old
    assert lease.generation == 2
    lease.release()


def test_a_release_that_cannot_write_logs_and_leaves_the_runs_outcome_alone(tmp_path, caplog):
    filesystem = FailingWrites()
    lease = OutputLease(Location(filesystem, str(tmp_path / "a")), "ending", timeout_s=180, heartbeat_s=3600)
    lease.acquire()
    filesystem.failing = True
    lease.release()  # does not raise
    assert (f"could not release the lease on output.path (OSError: [Errno 5] the store refused the write: "
            f"'{lease_file(tmp_path / 'a', 1)}'); the next run takes it over once it is stale, after "
            "output.lease_timeout_s=180 s") in caplog.text
    assert leases(tmp_path / "a")[1]["released"] is False
    filesystem.failing = False
    after = OutputLease(Location(filesystem, str(tmp_path / "a")), "after", timeout_s=180, heartbeat_s=3600)
    after.acquire()  # at once: the lease's run, in this process, has ended (elsewhere: once it is stale)
    assert (after.generation, after.limits) == (2, {1: 0})
    after.release()
    with pytest.raises(ValueError, match="^the run's own error$"):  # not replaced by the release's
        with OutputLease(Location(filesystem, str(tmp_path / "b")), "failing", timeout_s=180, heartbeat_s=3600):
            filesystem.failing = True
            raise ValueError("the run's own error")


def test_the_heartbeat_stops_at_a_newer_generation_and_never_writes_it(tmp_path):
    out = tmp_path / "out"
    output = resolve(str(out))
    old = OutputLease(output, "old", timeout_s=180, heartbeat_s=0.02)
    old.acquire()
    wait_until(lambda: old.heartbeats >= 2)
    new = OutputLease(output, "new", timeout_s=0, heartbeat_s=3600)  # judges any heartbeat stale: takes over
    new.acquire()
    written, modified = lease_file(out, 2).read_bytes(), lease_file(out, 2).stat().st_mtime_ns
    wait_until(lambda: not old.heartbeating.thread.is_alive())
    assert old.lost == f"run new on {socket.gethostname()} took output.path over"
    assert (lease_file(out, 2).read_bytes(), lease_file(out, 2).stat().st_mtime_ns) == (written, modified)
    old.release()
    assert (lease_file(out, 2).read_bytes(), lease_file(out, 2).stat().st_mtime_ns) == (written, modified)
    new.release()
    documents = leases(out)
    assert (documents[1]["owner"], documents[1]["released"]) == ("old", False)
    assert (documents[2]["owner"], documents[2]["released"], documents[2]["limits"]) == ("new", True, {"1": 0})


def test_sigterm_commits_what_is_finished_releases_the_lease_and_exits_12(local_ray, tmp_path):
    """Kubernetes stopping the driver's pod (or `ray job stop`) sends SIGTERM: the command line, attached
    to this process's Ray, commits the rows finished before it, releases its lease and exits with code 12
    and one line, without going on with the rest of the images; the rerun processes exactly the rest."""
    count = 12
    paths = write_images(tmp_path / "in", count)
    overrides = [*FAST_MODEL, f"data.path={tmp_path / 'in'}", f"output.path={tmp_path / 'out'}", "output.rows_per_file=2",
                 "output.commit_interval_s=0", "inference.batch_size=2"]
    address = local_ray.get_runtime_context().gcs_address
    driver = subprocess.Popen([sys.executable, "-m", "app", *overrides, f"ray.address={address}"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: len(list((tmp_path / "out").glob("part-*.parquet"))) >= 2 or driver.poll() is not None, 300)
        assert driver.poll() is None, "the run ended before it was stopped"
        driver.send_signal(signal.SIGTERM)
        _, stderr = driver.communicate(timeout=120)
    finally:
        driver.kill()
    assert driver.returncode == 12, stderr[-3000:]
    assert stderr.splitlines()[-1] == (
        "ray-detect: stopped: SIGTERM received: the rows finished before it are committed; rerun to go on")
    output = resolve(str(tmp_path / "out"))
    before = read_committed(output, ["path"]).column("path").to_pylist()
    assert 2 <= len(before) < count and len(set(before)) == len(before)
    assert not (tmp_path / "out" / "_staging").exists() and not (tmp_path / "out" / MANIFEST_NAME).exists()
    assert latest_readable_lease(output, lease_files(output))[1]["released"] is True

    summary = run(compose_config(overrides))
    assert (summary.inputs, summary.ok, summary.processed) == (count, count, count - len(before))
    assert sorted(read_committed(output, ["path"]).column("path").to_pylist()) == sorted(str(path) for path in paths)
