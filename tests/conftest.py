"""Fixtures and hooks: the tests' model made before the first test, local Ray instances, the order of the
modules, and the exit. The helpers the tests share are in tests/support/."""

import os

import pytest

from tests.support.models import light_checkpoint

# Keep Ray quiet and light in tests: no dashboard, no usage stats, small object store.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.pop("RAY_ADDRESS", None)

# The modules with a test that uses local_ray: they run first, one after another, on one Ray instance.
LOCAL_RAY_MODULES: set[str] = set()


def pytest_collection_modifyitems(config, items):
    """The modules that use local_ray first (otherwise in their order), so that one Ray instance serves
    them all; tests marked cuda skip where torch cannot use a GPU (scripts/gpu-check.sh runs them there)."""
    import torch

    LOCAL_RAY_MODULES.update(item.module.__name__ for item in items if "local_ray" in item.fixturenames)
    items.sort(key=lambda item: item.module.__name__ not in LOCAL_RAY_MODULES)
    if torch.cuda.is_available():
        return
    for item in items:
        if item.get_closest_marker("cuda"):
            item.add_marker(pytest.mark.skip(reason="needs CUDA: torch cannot use a GPU here"))


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
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=300 * 1024**2)
    return ray


@pytest.fixture(scope="module", autouse=True)
def ray_free_for_other_modules(request):
    """No Ray instance of the tests' own up when a module outside LOCAL_RAY_MODULES starts."""
    import ray

    if request.module.__name__ not in LOCAL_RAY_MODULES and ray.is_initialized():
        ray.shutdown()


_exit_status = 0


def pytest_sessionfinish(session, exitstatus):
    global _exit_status
    _exit_status = int(exitstatus)
    import ray

    ray.shutdown()  # local_ray's, when the last module used it


def pytest_unconfigure(config):
    """Leave at once once pytest has reported: the interpreter's own teardown, with Ray's and its metrics'
    native threads still around after the last `ray.shutdown()`, once ended in a segmentation fault after
    every test had run (exit code 139 instead of pytest's)."""
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_exit_status)
