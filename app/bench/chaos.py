"""The benchmark's chaos suite (`ray-detect bench chaos`): the app on generated images while faults are
injected, each against an undisturbed run of the same images, one line per fault:

preemption   a multi-node Ray cluster on this machine (ray.cluster_utils.Cluster; the driver a process of
             its own attached to it, as a RayJob's is): worker nodes holding detector actors removed and
             replaced --removals times, then the driver SIGKILLed once and the command run again;
s3-throttle  S3 (moto's server) behind the fault-injecting proxy (tests/support/s3_faults.py): 10% of the
             images' GETs answered 503 SlowDown or 500 InternalError;
s3-down      every GET of three images failing, then a rerun once the fault clears;
s3-requests  the first LIST, HEAD, GET and PUT of every key answered 503 SlowDown or reset (listing, image
             reads, commits, the manifest, the lease and its renewals);
s3-revoked   the credential revoked mid-run (every request answered 403 AccessDenied once a fifth of the
             images were read): the run stops (exit code 11), then a rerun once access is back;
duplicates   a manifest that lists every image twice (against one that lists each once);
sigterm      the driver (a process of its own) sent SIGTERM mid-run, then the command run again;
output-full  output.path on a tmpfs (needs root to mount it) that a ballast file fills mid-run; the
             ballast removed, a rerun.

Each line: faults injected, reads retried, runs it took, rows committed, duplicates and lost inputs (both
must be 0), and the images/s of all its runs together against the undisturbed run's.

The s3 faults need the fault proxy, which is test code and not part of the package: they run from a
checkout of the repository with the package installed editable (`pip install -e '.[test]'`).
"""

import contextlib
import importlib.util
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Callable, Optional

from app.bench.harness import input_folder
from app.exit_codes import ExitCode, fail

log = logging.getLogger(__name__)

# The light model with random weights, three detections an image: faults are about rows, not accuracy.
MODEL = ["model=fasterrcnn_mobilenet_v3_large_320_fpn", "model.weights=none", "model.score_threshold=0",
         "model.max_detections=3", "output.rows_per_file=16", "output.commit_interval_s=1"]


@dataclass
class Outcome:
    fault: str
    inputs: int
    injected: int  # nodes removed and drivers killed, GETs failed, disks filled
    retries: int  # reads the runs retried
    runs: int  # runs it took to complete the dataset (1 + reruns)
    rows: int  # committed rows at the end
    duplicates: int  # committed rows beyond one per input
    lost: int  # inputs without a committed row at the end
    seconds: float  # wall time of all its runs
    undisturbed_seconds: float

    def line(self) -> str:
        rate, base = self.inputs / self.seconds, self.inputs / self.undisturbed_seconds
        return (f"chaos {self.fault}: {self.injected} faults injected, {self.retries} reads retried, {self.runs} run(s), "
                f"{self.rows} rows, {self.duplicates} duplicates, {self.lost} lost; {rate:.2f} images/s, "
                f"{rate / base:.2f}x the undisturbed run's {base:.2f}")


def committed_paths(output: "Path | str") -> list[str]:
    """The path column of every committed row in an output (a local folder or a URI), as the app's readers
    see them (app.output.dataset.committed_files)."""
    from app.output.dataset import read_committed
    from app.storage import resolve

    return read_committed(resolve(str(output)), ["path"]).column("path").to_pylist()


def counts(paths: list[str], inputs: int) -> tuple[int, int, int]:
    """Rows, duplicates (rows beyond one per path) and lost inputs (inputs without a row)."""
    return len(paths), len(paths) - len(set(paths)), inputs - len(set(paths))


def app_command(*overrides: str) -> list[str]:
    return [sys.executable, "-m", "app", *MODEL, *overrides]


def clean_environment() -> dict:
    return {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}


def timed_run(command: list[str], **kwargs) -> tuple[int, float]:
    started = time.monotonic()
    done = subprocess.run(command, env=clean_environment(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kwargs)
    return done.returncode, time.monotonic() - started


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"chaos: timed out waiting for {what}")
        time.sleep(0.5)


def parts(output: Path) -> int:
    return len(list(output.glob("part-*.parquet"))) if output.exists() else 0


def preemption(images: Path, base: Path, inputs: int, removals: int) -> Outcome:
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.state import list_actors

    store = 200 * 1024**2
    cluster = Cluster(initialize_head=True, head_node_args=dict(num_cpus=1, include_dashboard=True, object_store_memory=store))
    workers = [cluster.add_node(num_cpus=2, object_store_memory=store) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        def command(output: Path) -> list[str]:
            return app_command(f"data.path={images}", f"output.path={output}", "inference.num_actors=2",
                               "inference.num_cpus_per_actor=1", f"ray.address={cluster.address}")

        code, undisturbed = timed_run(command(base / "preemption-undisturbed"))
        if code != 0:
            raise RuntimeError(f"chaos: the undisturbed run exited with {code}")
        output = base / "preemption"
        started = time.monotonic()
        driver = subprocess.Popen(command(output), env=clean_environment(), start_new_session=True,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        step = max(2, inputs // 16 // (removals + 3))  # committed files between faults (16 rows a file)
        try:
            for _ in range(removals):
                seen = parts(output)
                wait_for(lambda: parts(output) >= seen + step or driver.poll() is not None, 600, "committed files")
                alive = {actor.node_id for actor in list_actors(filters=[("state", "=", "ALIVE")]) if "Detector" in actor.class_name}
                victim = next((node for node in workers if node.node_id in alive), workers[0])
                cluster.remove_node(victim)
                workers = [node for node in workers if node is not victim] + [cluster.add_node(num_cpus=2, object_store_memory=store)]
            seen = parts(output)
            wait_for(lambda: parts(output) >= seen + step or driver.poll() is not None, 600, "committed files")
        finally:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
        code, _ = timed_run(command(output))
        seconds = time.monotonic() - started
        if code != 0:
            raise RuntimeError(f"chaos: the rerun after the driver's kill exited with {code}")
        return Outcome("preemption", inputs, removals + 1, 0, 2, *counts(committed_paths(output), inputs), round(seconds, 2),
                       round(undisturbed, 2))
    finally:
        ray.shutdown()
        cluster.shutdown()


# The fault-injecting S3 proxy the s3 faults put in front of moto: a test module beside the package in a
# checkout (app/ installed editable), absent from an installed wheel.
FAULT_PROXY = Path(__file__).resolve().parents[2] / "tests" / "support" / "s3_faults.py"


def load_fault_proxy() -> ModuleType:
    """The module tests/support/s3_faults.py of the checkout this package runs from; stops the command
    with exit code 2 and one line saying what to do where there is none."""
    if not FAULT_PROXY.is_file():
        others = " ".join(name for name in FAULTS if name != "s3")
        fail(ExitCode.USAGE, f"ray-detect bench chaos: error: the s3 faults need the fault proxy of the repository's "
                             f"tests, which is not at {FAULT_PROXY}: run them from a checkout with the package "
                             f"installed editable (pip install -e '.[test]'), or leave them out: --chaos-faults {others}")
    spec = importlib.util.spec_from_file_location("s3_faults", FAULT_PROXY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def s3_behind_proxy(images: Path, fault_proxy: ModuleType):
    """The images under s3://chaos/in/ on moto's server, behind a FaultProxy of `fault_proxy`."""
    with fault_proxy.moto_behind_proxy("chaos") as (proxy, client):
        for path in sorted(images.iterdir()):
            client.put_object(Bucket="chaos", Key=f"in/{path.name}", Body=path.read_bytes())
        yield proxy


def s3_run(output: str, *overrides: str) -> tuple[Optional[object], float]:
    """pipeline.run on s3://chaos/in in this process (a local Ray it starts and stops): its summary, or
    the InputsLeft error's, and its wall time."""
    import ray

    from app import pipeline
    from app.commit import InputsLeft
    from app.config import compose_config
    from app.output.verdicts import StorageRefused

    started = time.monotonic()
    try:
        summary = pipeline.run(compose_config([*MODEL, "data.path=s3://chaos/in", f"output.path=s3://chaos/{output}", *overrides]))
    except InputsLeft as error:
        summary = error.summary
    except StorageRefused:
        summary = None
    finally:
        ray.shutdown()
    return summary, time.monotonic() - started


def s3_faults(images: Path, inputs: int) -> list[Outcome]:
    fault_proxy = load_fault_proxy()
    Rule = fault_proxy.Rule
    ACCESS_DENIED, INTERNAL_ERROR, RESET, SLOW_DOWN = (
        fault_proxy.ACCESS_DENIED, fault_proxy.INTERNAL_ERROR, fault_proxy.RESET, fault_proxy.SLOW_DOWN)
    every_method = ("GET", "HEAD", "PUT", "POST", "DELETE")

    def rows_of(output: str) -> list[str]:
        return committed_paths(f"s3://chaos/{output}")

    with s3_behind_proxy(images, fault_proxy) as proxy:
        _, undisturbed = s3_run("undisturbed")
        proxy.rules = [Rule(SLOW_DOWN, key=r"/in/.*", fraction=0.05, seed=1), Rule(INTERNAL_ERROR, key=r"/in/.*", fraction=0.05 / 0.95, seed=2)]
        summary, seconds = s3_run("throttle")
        injected, proxy.rules = sum(proxy.injected().values()), []
        throttle = Outcome("s3-throttle", inputs, injected, summary.read_retries, 1, *counts(rows_of("throttle"), inputs),
                           round(seconds, 2), round(undisturbed, 2))
        names = sorted(path.name for path in images.iterdir())[:: max(1, inputs // 3)][:3]
        proxy.rules = [Rule(SLOW_DOWN, key="|".join(f"/in/{name}$" for name in names))]
        first, first_s = s3_run("down", "data.read_attempts=3")
        injected, proxy.rules = sum(proxy.injected().values()), []
        again, again_s = s3_run("down", "data.read_attempts=3")
        down = Outcome("s3-down", inputs, injected, first.read_retries + again.read_retries, 2, *counts(rows_of("down"), inputs),
                       round(first_s + again_s, 2), round(undisturbed, 2))
        proxy.rules = [Rule(SLOW_DOWN, methods=("GET", "PUT"), first=1), Rule(RESET, methods=("HEAD",), first=1)]
        summary, seconds = s3_run("requests")
        injected, proxy.rules = sum(proxy.injected().values()), []
        requests = Outcome("s3-requests", inputs, injected, summary.read_retries, 1, *counts(rows_of("requests"), inputs),
                           round(seconds, 2), round(undisturbed, 2))
        # Each image read is a HEAD and a GET.
        proxy.rules = [Rule(ACCESS_DENIED, methods=every_method, after=2 * (inputs // 5), after_key="/in/")]
        stopped, first_s = s3_run("revoked", "output.lease_timeout_s=4", "output.lease_heartbeat_s=1")
        injected, proxy.rules = sum(proxy.injected().values()), []
        if stopped is not None:
            raise RuntimeError("chaos: the run whose credential was revoked was not stopped")
        again, again_s = s3_run("revoked", "output.lease_timeout_s=4", "output.lease_heartbeat_s=1", "output.lease_wait_s=10")
        revoked = Outcome("s3-revoked", inputs, injected, again.read_retries, 2, *counts(rows_of("revoked"), inputs),
                          round(first_s + again_s, 2), round(undisturbed, 2))
    return [throttle, down, requests, revoked]


def duplicates(images: Path, base: Path, inputs: int) -> Outcome:
    """A CSV manifest that lists every image twice, in two halves, against one that lists each once."""
    names = sorted(path.name for path in images.iterdir())
    once, twice = base / "once.csv", base / "twice.csv"
    once.write_text("path\n" + "".join(f"{images / name}\n" for name in names))
    twice.write_text("path\n" + "".join(f"{images / name}\n" for name in names * 2))
    _, undisturbed = timed_run(app_command(f"data.manifest={once}", f"output.path={base / 'duplicates-undisturbed'}", "ray.num_cpus=2"))
    code, seconds = timed_run(app_command(f"data.manifest={twice}", f"output.path={base / 'duplicates'}", "ray.num_cpus=2"))
    if code != 0:
        raise RuntimeError(f"chaos: the run of a manifest listing every image twice exited with {code}")
    return Outcome("duplicates", inputs, inputs, 0, 1, *counts(committed_paths(base / "duplicates"), inputs), round(seconds, 2),
                   round(undisturbed, 2))


def sigterm(images: Path, base: Path, inputs: int) -> Outcome:
    """The driver stopped by SIGTERM once it committed a third of the files, then run again."""
    output = base / "sigterm"
    command = app_command(f"data.path={images}", f"output.path={output}", "ray.num_cpus=2")
    _, undisturbed = timed_run(app_command(f"data.path={images}", f"output.path={base / 'sigterm-undisturbed'}", "ray.num_cpus=2"))
    started = time.monotonic()
    driver = subprocess.Popen(command, env=clean_environment(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: parts(output) >= max(1, inputs // 16 // 3) or driver.poll() is not None, 600, "committed files")
    driver.send_signal(signal.SIGTERM)
    if driver.wait() != 12:
        raise RuntimeError(f"chaos: the run sent SIGTERM exited with {driver.returncode}, not 12")
    code, again = timed_run(command)
    if code != 0:
        raise RuntimeError(f"chaos: the rerun after SIGTERM exited with {code}")
    return Outcome("sigterm", inputs, 1, 0, 2, *counts(committed_paths(output), inputs),
                   round(time.monotonic() - started, 2), round(undisturbed, 2))


def output_full(images: Path, base: Path, inputs: int) -> Optional[Outcome]:
    """The output on a tmpfs that a ballast file fills once the run has committed a few files; the
    ballast is removed before the rerun."""
    mount_point = base / "full"
    mount_point.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs", str(mount_point)], capture_output=True).returncode:
        log.info("chaos output-full: skipped, mounting a tmpfs needs root")
        return None
    try:
        output, ballast = mount_point / "out", mount_point / "ballast"
        command = app_command(f"data.path={images}", f"output.path={output}", "ray.num_cpus=2")
        _, undisturbed = timed_run(app_command(f"data.path={images}", f"output.path={base / 'full-undisturbed'}", "ray.num_cpus=2"))
        started = time.monotonic()
        driver = subprocess.Popen(command, env=clean_environment(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: parts(output) >= 2 or driver.poll() is not None, 600, "committed files")
        with open(ballast, "wb") as file:  # all the space left but 4 KiB
            os.posix_fallocate(file.fileno(), 0, max(1, os.statvfs(mount_point).f_bavail * os.statvfs(mount_point).f_frsize - 4096))
        code = driver.wait()
        first = time.monotonic() - started
        if code != 10:
            raise RuntimeError(f"chaos: the run on a full volume exited with {code}, not 10")
        ballast.unlink()
        code, again = timed_run(command)
        if code != 0:
            raise RuntimeError(f"chaos: the rerun on the grown volume exited with {code}")
        return Outcome("output-full", inputs, 1, 0, 2, *counts(committed_paths(output), inputs), round(first + again, 2),
                       round(undisturbed, 2))
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


# The suite's faults by the name --chaos-faults takes: each makes its outcomes (s3 all of its lines).
FAULTS = {
    "preemption": lambda images, base, args: [preemption(images, base, args.chaos_images, args.removals)],
    "s3": lambda images, base, args: s3_faults(images, args.chaos_images),
    "duplicates": lambda images, base, args: [duplicates(images, base, args.chaos_images)],
    "sigterm": lambda images, base, args: [sigterm(images, base, args.chaos_images)],
    "output-full": lambda images, base, args: [output_full(images, base, args.chaos_images)],
}


def run(args, base: Path) -> list[dict]:
    """The faults of --chaos-faults (every one by default) on --chaos-images images; the outcomes as dicts."""
    if "s3" in args.chaos_faults:
        load_fault_proxy()  # where it is missing, stop now rather than after the faults before s3
    images = input_folder(base, "chaos", args.chaos_images, args)
    base = Path(tempfile.mkdtemp(prefix="chaos-", dir=base))
    outcomes = [outcome for name in args.chaos_faults for outcome in FAULTS[name](images, base, args)]
    for outcome in outcomes:
        if outcome is not None:
            log.info(outcome.line())
    return [asdict(outcome) for outcome in outcomes if outcome is not None]


def lines(results: list[dict]) -> list[str]:
    return [Outcome(**result).line() for result in results]
