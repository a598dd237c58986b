"""The image's pinned requirements have wheels for the image's platform on PyPI, the index the image's pip
uses: pip resolves exactly what the Dockerfile installs for CPython 3.11 on Linux x86_64 (manylinux up to
glibc 2.35) without installing it or downloading its wheels, and every pin lands at its pinned version on a
wheel that the image can run, with the CUDA runtime of the base image.

This stands in for the dependency layer of `docker build`, as there is no Docker engine where the tests
run: issue 23's image pinned a torch build that its index did not have, and nothing but a build would have
said so. The test needs PyPI and fails without it.

pyproject.toml's requires-python is checked the same way: the newest Python it allows has a wheel of every
pin, and the Pythons just outside it lack one.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet
from packaging.tags import compatible_tags, cpython_tags
from packaging.utils import canonicalize_name, parse_wheel_filename
from tests.support.dockerfile import IMAGE_PINS, PYPROJECT, ROOT, instructions

pytestmark = pytest.mark.slow  # pip resolves the image's requirements against PyPI


# The index the image's pip uses (the base image configures no other), and where PyPI serves its files.
PYPI = "https://pypi.org/simple"
PYPI_FILES = "https://files.pythonhosted.org/packages/"
# The base image's Python and platform: CPython 3.11 on Ubuntu 22.04, x86_64, glibc 2.35. pip takes each
# --platform literally, so every manylinux glibc up to 2.35 is named, and the legacy names too (glibc 2.17,
# 2.12, 2.5), which some wheels carry alone (ray's: manylinux2014).
IMAGE_PLATFORMS = [f"manylinux_2_{minor}_x86_64" for minor in range(35, 4, -1)] + [
    "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64",
]
IMAGE_TAGS = frozenset([
    *cpython_tags((3, 11), ["cp311"], IMAGE_PLATFORMS), *compatible_tags((3, 11), "cp311", IMAGE_PLATFORMS),
])


def linux_target(python: str) -> list[str]:
    """pip's options for wheels that CPython `python` ("3.11") runs on the image's platform."""
    return ["--only-binary=:all:", "--python-version", python, "--implementation", "cp",
            "--abi", f"cp{python.replace('.', '')}", *[argument for platform in IMAGE_PLATFORMS for argument in ("--platform", platform)]]


IMAGE_TARGET = linux_target("3.11")
# pip evaluates the markers of dependencies (torch's CUDA wheels are `platform_system == "Linux"`) on the
# machine it runs on, not for --platform: only there is the resolution the image's.
IMAGE_MARKERS = {"sys_platform": "linux", "platform_machine": "x86_64", "implementation_name": "cpython",
                 "python_version": "3.11"}
# hydra-core 1.3 requires antlr4-python3-runtime==4.9.*, pure Python, whose 4.9 releases PyPI has as source
# only; the image's pip builds it. pip takes no source distribution for a --platform, so the test builds
# that wheel first and the resolution finds it in a folder.
BUILT_FROM_SOURCE = ["antlr4-python3-runtime==4.9.*"]
# The PIP_* variables that say how to reach the network; pip is given no other.
PIP_NETWORK_VARIABLES = {"PIP_CERT", "PIP_CLIENT_CERT", "PIP_PROXY", "PIP_DEFAULT_TIMEOUT", "PIP_RETRIES"}


def pypi_only_environment() -> dict[str, str]:
    """The environment for a pip that knows PyPI alone, as the image's does: no configuration file and no
    PIP_* variable but the network's. A machine's pip configuration may add indexes, local wheels or
    constraints (this project's dev machines have all three), and a local wheel would satisfy a pin that
    PyPI lacks: the very failure this test looks for."""
    kept = {name: value for name, value in os.environ.items()
            if not name.startswith("PIP_") or name in PIP_NETWORK_VARIABLES}
    return {**kept, "PIP_CONFIG_FILE": os.devnull}


def pip(*arguments: str) -> subprocess.CompletedProcess:
    """pip with PyPI as its only index, no cache and no configuration of this machine."""
    return subprocess.run(
        [sys.executable, "-m", "pip", *arguments, "--quiet", "--disable-pip-version-check", "--no-cache-dir",
         "--index-url", PYPI],
        env=pypi_only_environment(), capture_output=True, text=True, timeout=180,
    )


def pip_errors(done: subprocess.CompletedProcess) -> list[str]:
    return [line for line in done.stderr.splitlines() if line.startswith("ERROR:")]


def resolve_for_the_image(requirements: list[str], folder: Path, find_links: Path | None = None
                          ) -> tuple[subprocess.CompletedProcess, dict | None]:
    """pip's resolution of the requirements for the image's Python and platform, and its report (None when
    there is none). Nothing is installed and no wheel downloaded: pip reads each wheel's metadata alone, from
    the index's PEP 658 file, or else with HTTP range requests into the wheel (fast-deps); without either it
    would download every wheel, 2 GB with torch's CUDA libraries."""
    (folder / "requirements.txt").write_text("".join(f"{requirement}\n" for requirement in requirements))
    report = folder / "report.json"
    done = pip("install", "--dry-run", "--ignore-installed", "--report", str(report), "--use-feature=fast-deps",
               *IMAGE_TARGET, *(["--find-links", str(find_links)] if find_links else []),
               "-r", str(folder / "requirements.txt"))
    return done, json.loads(report.read_text()) if done.returncode == 0 else None


def the_images_requirements(folder: Path) -> list[str]:
    """The requirements the Dockerfile installs, from its own program run on pyproject.toml."""
    run = next(args for keyword, args in instructions() if keyword == "RUN" and "requirements.txt" in args)
    program = re.fullmatch(r'python -c "([^"]+)" > /tmp/requirements\.txt .*', run).group(1)
    (folder / "ray-detect").mkdir()
    (folder / "ray-detect" / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    done = subprocess.run([sys.executable, "-c", program], cwd=folder, capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stderr) == (0, "")
    return done.stdout.splitlines()


@pytest.fixture(scope="module")
def source_built_wheels(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("source-built-wheels")
    done = pip("wheel", "--no-deps", "--wheel-dir", str(folder), *BUILT_FROM_SOURCE)
    assert (done.returncode, pip_errors(done)) == (0, []), done.stderr
    assert sorted(path.name for path in folder.iterdir()) == ["antlr4_python3_runtime-4.9.3-py3-none-any.whl"]
    return folder


@pytest.fixture(scope="module")
def image_resolution(tmp_path_factory, source_built_wheels) -> dict:
    """pip's report for the image's requirements."""
    folder = tmp_path_factory.mktemp("image-resolution")
    requirements = the_images_requirements(folder)
    assert requirements == IMAGE_PINS
    done, report = resolve_for_the_image(requirements, folder, find_links=source_built_wheels)
    assert (done.returncode, pip_errors(done)) == (0, []), done.stderr
    assert {key: report["environment"][key] for key in IMAGE_MARKERS} == IMAGE_MARKERS, (
        "pip evaluates markers for the machine it runs on: the image's resolution needs Linux x86_64, CPython 3.11"
    )
    return report


def installed(report: dict) -> dict[str, dict]:
    return {canonicalize_name(item["metadata"]["name"]): item for item in report["install"]}


def test_every_pin_resolves_at_its_version(image_resolution):
    pins = dict(re.fullmatch(r"([\w.-]+)(?:\[[^\]]*\])?==(\S+)", requirement).groups()
                for requirement in IMAGE_PINS)
    requested = {name: item["metadata"]["version"] for name, item in installed(image_resolution).items()
                 if item["requested"]}
    assert requested == {canonicalize_name(name): version for name, version in pins.items()}
    assert len(requested) == 14


def test_every_package_is_a_wheel_from_pypi_that_the_image_runs(image_resolution):
    """Pinned or pulled in, each package is a wheel whose tags fit the image's Python and platform, from
    PyPI, but for the one the image's pip builds from source."""
    files = {name: item["download_info"]["url"].rsplit("/", 1) for name, item in installed(image_resolution).items()}
    assert {name: file for name, (place, file) in files.items() if not f"{place}/".startswith(PYPI_FILES)} == {
        "antlr4-python3-runtime": "antlr4_python3_runtime-4.9.3-py3-none-any.whl"
    }
    assert {name: file for name, (_, file) in files.items()
            if not (file.endswith(".whl") and parse_wheel_filename(file)[3] & IMAGE_TAGS)} == {}
    assert (files["torch"][1], files["torchvision"][1]) == (
        "torch-2.14.1-cp311-cp311-manylinux_2_28_x86_64.whl", "torchvision-0.29.1-cp311-cp311-manylinux_2_28_x86_64.whl"
    )


def test_pypis_torch_brings_the_cuda_of_the_base_image(image_resolution):
    """PyPI's Linux torch 2.14.1 depends on the CUDA 13.0 runtime, the base image's (cu130), which the
    Dockerfile's check of torch.version.cuda then confirms in the build."""
    base = next(args for keyword, args in instructions() if keyword == "FROM")
    cuda = list(re.fullmatch(r"rayproject/ray:.*-cu(\d+)(\d)", base).groups())
    assert cuda == ["13", "0"]
    packages = installed(image_resolution)
    assert {name: packages[name]["metadata"]["version"].split(".")[:2]
            for name in ("cuda-toolkit", "nvidia-cuda-runtime")} == {"cuda-toolkit": cuda, "nvidia-cuda-runtime": cuda}


@pytest.mark.parametrize(("requirement", "versions_for_the_image"), [
    # The CUDA 12.8 build issue 23's image asked for: PyPI has torch 2.14.1, as the CUDA 13.0 build only.
    ("torch==2.14.1+cu128", r".*, 2\.14\.1(, .*)?"),
    # A release on PyPI with wheels for Windows only: none of its versions is for the image.
    ("pywin32==311", "none"),
])
def test_a_pin_without_a_wheel_for_the_image_fails_the_resolution(tmp_path, requirement, versions_for_the_image):
    done, report = resolve_for_the_image([requirement], tmp_path)
    errors = pip_errors(done)
    assert (done.returncode, report, errors[-1:]) == (
        1, None, [f"ERROR: No matching distribution found for {requirement}"]
    ), done.stderr
    # What PyPI offers the image (for torch, this also shows that PyPI answered).
    assert re.fullmatch(rf"ERROR: Could not find a version that satisfies the requirement {re.escape(requirement)} "
                        rf"\(from versions: {versions_for_the_image}\)", errors[-2]), errors


REQUIRES_PYTHON = SpecifierSet(PYPROJECT["project"]["requires-python"])


def resolve_the_pins_alone(python: str) -> subprocess.CompletedProcess:
    """pip's resolution of the [project] pins alone (--no-deps) for CPython `python` on Linux x86_64."""
    return pip("install", "--dry-run", "--no-deps", "--ignore-installed", *linux_target(python),
               *IMAGE_PINS)


def test_the_newest_python_that_requires_python_allows_has_a_wheel_of_every_pin():
    """requires-python's upper edge (its lower, 3.11, is the image's, resolved in full above). Only the pins
    are looked up: their dependencies' wheels for 3.14 were checked by hand when the range was set."""
    assert [minor for minor in range(8, 20) if f"3.{minor}" in REQUIRES_PYTHON] == [11, 12, 13, 14]
    done = resolve_the_pins_alone("3.14")
    assert (done.returncode, pip_errors(done)) == (0, []), done.stderr


@pytest.mark.parametrize("python", ["3.10", "3.15"])
def test_the_pythons_just_outside_requires_python_lack_a_wheel_of_a_pin(python):
    """When one of these resolves, a pin gained the wheels to widen requires-python."""
    assert python not in REQUIRES_PYTHON
    done = resolve_the_pins_alone(python)
    missing = re.fullmatch(r"ERROR: No matching distribution found for (.+)", pip_errors(done)[-1]).group(1)
    pins = [re.sub(r"\[.*\]", "", pin) for pin in IMAGE_PINS]  # pip names no extras
    assert (done.returncode, missing in pins) == (1, True), done.stderr
