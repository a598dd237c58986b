"""The Dockerfile read as its instructions, and the pyproject it installs."""

import re
import tomllib

import yaml

from tests.support import k8s_validation as kv

ROOT = kv.REPO_ROOT
DOCKERFILE = ROOT / "Dockerfile"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# What the image installs: the [project] dependencies and the job's extras for table outputs (Dockerfile).
IMAGE_PINS = (PYPROJECT["project"]["dependencies"] + PYPROJECT["project"]["optional-dependencies"]["delta"]
                      + PYPROJECT["project"]["optional-dependencies"]["iceberg"])
CHART_META = yaml.safe_load((kv.CHART_DIR / "Chart.yaml").read_text())
CHART_VALUES = yaml.safe_load((kv.CHART_DIR / "values.yaml").read_text())


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(
        line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#")
    ))
    found = []
    for line in text.splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            found.append((keyword.upper(), " ".join(rest.split())))
    return found
