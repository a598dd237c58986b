"""The package as a user installs it: the wheel built from what the image copies (pyproject.toml,
README.md, app/), its files listed, then installed (not editable) into a new virtual environment outside
the repository and run from a folder outside it too, so that nothing can come from the checkout.

The new environment downloads nothing: the wheel goes in with --no-deps and a .pth file puts this
environment's site-packages (the pinned dependencies) after its own. This environment has the package
installed editable, through an import hook that a .pth line of this kind does not load, so `app` can only
come from the wheel. Cost: about 25 s on 2 busy cores, mostly imports: the wheel's build (5 s), the
environment (3 s), and three commands in it (submit 4 s, report 12 s).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from app import submit
from app.bench import chaos
from tests.support.images import gradient_jpeg
from tests.support.k8s_validation import K8S_DIR, REPO_ROOT
from tests.support.results import ok_row, write_results

pytestmark = pytest.mark.slow  # builds the wheel and installs it into a new virtual environment

VERSION = "0.1.0"
WHEEL_NAME = f"ray_detect-{VERSION}-py3-none-any.whl"
OVERRIDES = ["data.path=s3://my-bucket/images", "output.path=s3://my-bucket/detections/run-3"]


def checkout_files(folder: str) -> set[str]:
    """The files under a folder of the checkout, as paths relative to the repository, bytecode left out."""
    return {path.relative_to(REPO_ROOT).as_posix() for path in (REPO_ROOT / folder).rglob("*")
            if path.is_file() and "__pycache__" not in path.parts}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built offline from a copy of what the Dockerfile copies (so no build/ or egg-info lands
    in the checkout), without build isolation: this environment's setuptools builds it."""
    source, dist = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("dist")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / name, source / name)
    shutil.copytree(REPO_ROOT / "app", source / "app", ignore=shutil.ignore_patterns("__pycache__"))
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "--no-cache-dir",
         "--disable-pip-version-check", "--quiet", "--wheel-dir", str(dist), str(source)],
        env={**os.environ, "PIP_CONFIG_FILE": os.devnull}, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert [path.name for path in dist.iterdir()] == [WHEEL_NAME]
    return dist / WHEEL_NAME


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """A new virtual environment, outside the repository, with the wheel installed; its bin/ folder."""
    venv = tmp_path_factory.mktemp("fresh") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    [purelib] = (venv / "lib").glob("python3.*/site-packages")
    (purelib / "dependencies.pth").write_text("".join(f"{path}\n" for path in site.getsitepackages()))
    done = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--no-deps", "--no-index",
         "--no-cache-dir", "--disable-pip-version-check", "--quiet", str(wheel)],
        env={**os.environ, "PIP_CONFIG_FILE": os.devnull}, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return venv / "bin"


def run_outside(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """A command run from a folder outside the repository, with no PYTHONPATH."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_the_wheel_holds_the_package_and_its_data_and_no_test_code(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {name.split("/")[0] for name in names} == {"app", f"ray_detect-{VERSION}.dist-info"}
    assert [name for name in names if "tests/" in name or "s3_faults" in name or "__pycache__" in name] == []
    # Every file of app/ in the checkout, so the configs, the sample photos and the RayJob manifest too.
    assert {name for name in names if name.startswith("app/")} == checkout_files("app")
    assert {"app/conf/config.yaml", "app/samples/astronaut.jpg", "app/manifests/rayjob.yaml"} <= names
    assert zipfile.ZipFile(wheel).read("app/manifests/rayjob.yaml") == (K8S_DIR / "rayjob.yaml").read_bytes()
    entry_points = zipfile.ZipFile(wheel).read(f"ray_detect-{VERSION}.dist-info/entry_points.txt").decode()
    assert entry_points == "[console_scripts]\nray-detect = app.cli:main\n"


def test_the_package_is_imported_from_the_new_environment(installed, tmp_path):
    done = run_outside([str(installed / "python"), "-c", "import app.submit; print(app.__file__); print(app.submit.DEFAULT_MANIFEST)"],
                       tmp_path)
    site_packages = next((installed.parent / "lib").glob("python3.*/site-packages"))
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout.splitlines() == [str(site_packages / "app" / "__init__.py"),
                                        str(site_packages / "app" / "manifests" / "rayjob.yaml")]


def test_submit_dry_run_works_outside_the_checkout(installed, tmp_path):
    done = run_outside([str(installed / "ray-detect"), "submit", "--dry-run", "-n", "team-a",
                        "--image", "registry.example/ray-detect:0.1.0", *OVERRIDES], tmp_path)
    assert (done.returncode, done.stderr) == (0, "")
    job = yaml.safe_load(done.stdout)
    assert job["metadata"]["generateName"] == "ray-detect-run-" and job["metadata"]["namespace"] == "team-a"
    assert [c["image"] for c in job["spec"]["submitterPodTemplate"]["spec"]["containers"]] == [
        "registry.example/ray-detect:0.1.0"]
    assert job["spec"]["entrypoint"] == (
        "python -m app 'data.path=s3://my-bucket/images' 'output.path=s3://my-bucket/detections/run-3'")
    # The rest is k8s/rayjob.yaml's, exactly as the checkout's submit prints it.
    manifest = submit.load_manifest(K8S_DIR / "rayjob.yaml")
    expected = submit.build_rayjob(manifest, OVERRIDES, "team-a", image="registry.example/ray-detect:0.1.0")
    assert done.stdout == yaml.safe_dump(expected, sort_keys=False)


def test_report_works_outside_the_checkout(installed, tmp_path):
    (tmp_path / "images").mkdir()
    images = [tmp_path / "images" / name for name in ("a.jpg", "b.jpg")]
    for number, image in enumerate(images):
        image.write_bytes(gradient_jpeg(200, 150, number))
    rows = [ok_row(images[0], [(17, "cat", 0.9, [40, 30, 160, 120])]), ok_row(images[1])]
    results = write_results(tmp_path / "results", rows)
    done = run_outside([str(installed / "ray-detect"), "report", results, "--out", "report"], tmp_path)
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout == f"ray-detect report: 2 previews; open {tmp_path / 'report' / 'index.html'}\n"
    written = sorted(path.relative_to(tmp_path / "report").as_posix() for path in (tmp_path / "report").rglob("*"))
    assert written == ["index.html", "previews", "previews/0001_a.jpg", "previews/0002_b.jpg"]
    counts = dict(re.findall(r'<dd id="(\w+)">(\d+)</dd>', (tmp_path / "report" / "index.html").read_text()))
    assert {key: counts[key] for key in ("images", "ok", "errors", "detections")} == {
        "images": "2", "ok": "2", "errors": "0", "detections": "1"}


def test_the_chaos_suites_s3_faults_need_a_checkout_and_say_so(monkeypatch, tmp_path, capsys):
    """The fault proxy is test code, absent from the wheel (above): the chaos suite finds it in the checkout
    it runs from, and where it is missing its s3 faults stop at once with one line, before any run. (In
    this process, as the command costs 8 s of imports in a subprocess.)"""
    assert chaos.FAULT_PROXY == REPO_ROOT / "tests" / "support" / "s3_faults.py"
    assert chaos.load_fault_proxy().Rule(chaos.load_fault_proxy().SLOW_DOWN).fault == "SlowDown"
    absent = tmp_path / "site-packages" / "tests" / "support" / "s3_faults.py"
    monkeypatch.setattr(chaos, "FAULT_PROXY", absent)
    with pytest.raises(SystemExit) as stop:
        chaos.run(argparse.Namespace(chaos_faults=["s3"], chaos_images=4), tmp_path / "bench")
    assert stop.value.code == 2
    assert capsys.readouterr() == ("", (
        f"ray-detect bench chaos: error: the s3 faults need the fault proxy of the repository's tests, which is not "
        f"at {absent}: run them from a checkout with the package installed editable (pip install -e '.[test]'), or "
        f"leave them out: --chaos-faults preemption duplicates sigterm output-full\n"))
    assert sorted(tmp_path.iterdir()) == []  # no inputs generated
