#!/usr/bin/env python3
"""One version, everywhere: check that every file names the versions pyproject.toml and Chart.yaml give.

    python3 scripts/check-version.py                 # the tree: exit 1 listing every disagreement
    python3 scripts/check-version.py --tag v0.1.0    # also: may this tag be released? (the release workflow)

The app's version is pyproject.toml's [project] version: app/__init__.py, the chart's appVersion (the
default image tag), the Dockerfile's label and every ghcr.io/ray-detect/ray-detect:X.Y.Z the docs and
manifests name must equal it. The chart's version is its own (the chart README's *Versions*); the docs'
`--version` of the chart from the registry and the registry kustomizations must equal it. CHANGELOG.md keeps
Keep a Changelog's form: [Unreleased] first, then one dated section per release, newest first, each naming
its chart version, both versions rising release over release.

A tag vX.Y.Z may be released when X.Y.Z is pyproject.toml's version and CHANGELOG.md has the dated section
`## [X.Y.Z] - YYYY-MM-DD` naming Chart.yaml's version. With --repository-owner, the chart's default image
must also be the one the release workflow pushes, ghcr.io/<owner>/ray-detect.

Only the standard library: the release workflow runs this before anything is installed.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path

SEMVER = r"\d+\.\d+\.\d+"
IMAGE = "ghcr.io/ray-detect/ray-detect"
CHART_REF = "oci://ghcr.io/ray-detect/charts"

# (file, pattern, which version, what it is): every match of the pattern's group must be that version,
# and there must be at least one match (a place that disappears is noticed, not skipped).
PLACES = [
    ("app/__init__.py", rf'^__version__ = "({SEMVER})"$', "app", "__version__"),
    ("charts/ray-detect/Chart.yaml", rf'^appVersion: "({SEMVER})"$', "app", "appVersion"),
    ("charts/ray-detect/Chart.yaml", rf"image: {IMAGE}:({SEMVER})$", "app", "the artifacthub.io/images tag"),
    ("Dockerfile", rf'org\.opencontainers\.image\.version="({SEMVER})"', "app", "the image version label"),
    ("Dockerfile", rf"{IMAGE}:({SEMVER})\b", "app", "the image tag"),
    ("docs/kubernetes.md", rf"(?:{IMAGE}|registry\.example\.com/ml/ray-detect):({SEMVER})\b", "app", "the image tag"),
    ("docs/kubernetes.md", rf"--set image\.tag=({SEMVER})\b", "app", "the image tag set"),
    ("docs/kubernetes.md", rf"git checkout v({SEMVER})\b", "app", "the release tag"),
    ("docs/kubernetes.md", rf"release\.yml@refs/tags/v({SEMVER})$", "app", "the signer's tag"),
    ("docs/runs.md", rf"release's tag \(`v({SEMVER})\b", "app", "the release tag"),
    ("charts/ray-detect/README.md", rf"release\.yml@refs/tags/v({SEMVER})$", "app", "the signer's tag"),
    ("charts/ray-detect/README.md", rf"^Chart {SEMVER}, app ({SEMVER}),", "app", "the app version of its summary line"),
    ("charts/ray-detect/examples/values-gpu-prod.yaml", rf'^  tag: "({SEMVER})"', "app", "the image tag"),
    ("k8s/rayjob.yaml", rf"{IMAGE}:({SEMVER})$", "app", "the image tag"),
    ("k8s/rayjob.yaml", rf'app\.kubernetes\.io/version: "({SEMVER})"$', "app", "the app.kubernetes.io/version label"),
    ("charts/ray-detect/README.md", rf"^Chart ({SEMVER}), app", "chart", "the chart version of its summary line"),
    ("charts/ray-detect/README.md", rf"{CHART_REF}/ray-detect --version ({SEMVER})\b", "chart", "the chart version to install"),
    ("README.md", rf"{CHART_REF}/ray-detect --version ({SEMVER})\b", "chart", "the chart version to install"),
    ("docs/kubernetes.md", rf"{CHART_REF}/ray-detect --version ({SEMVER})\b", "chart", "the chart version to install"),
    ("docs/kubernetes.md", rf"ghcr\.io/ray-detect/charts/ray-detect:({SEMVER})\b", "chart", "the chart version verified"),
    ("k8s/registry/dev/kustomization.yaml", rf"^    version: ({SEMVER})$", "chart", "the chart version pulled"),
    ("k8s/registry/prod/kustomization.yaml", rf"^    version: ({SEMVER})$", "chart", "the chart version pulled"),
]
# Every file this script reads, for tests that copy them.
FILES = sorted({"pyproject.toml", "CHANGELOG.md", "charts/ray-detect/values.yaml", *(p[0] for p in PLACES)})

RELEASE_HEADING = re.compile(rf"^## \[({SEMVER})\] - (\d{{4}}-\d{{2}}-\d{{2}})$")
CHART_LINE = re.compile(rf"^Chart ({SEMVER})\b", re.MULTILINE)


def semver(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def read_chart_version(root: Path) -> str:
    match = re.search(rf'^version: "?({SEMVER})"?$', (root / "charts/ray-detect/Chart.yaml").read_text(), re.MULTILINE)
    if not match:
        raise SystemExit("check-version: charts/ray-detect/Chart.yaml has no version: X.Y.Z line")
    return match.group(1)


def changelog_sections(text: str) -> list[tuple[str, str]]:
    """(heading, body) of each `## ` section of CHANGELOG.md, in order."""
    parts = re.split(r"^(## .*)$", text, flags=re.MULTILINE)
    return [(parts[i], parts[i + 1]) for i in range(1, len(parts), 2)]


def changelog_errors(text: str, chart_version: str) -> tuple[list[str], dict[str, str]]:
    """The errors of CHANGELOG.md's form, and the chart version each release section names."""
    errors: list[str] = []
    sections = changelog_sections(text)
    if not sections or sections[0][0] != "## [Unreleased]":
        errors.append("CHANGELOG.md: the first section must be ## [Unreleased]")
    releases: list[tuple[str, str, str]] = []  # (version, date, chart version)
    for heading, body in sections[1:]:
        match = RELEASE_HEADING.match(heading)
        chart = CHART_LINE.search(body)
        if not match:
            errors.append(f"CHANGELOG.md: {heading!r} is not ## [X.Y.Z] - YYYY-MM-DD")
        elif not chart:
            errors.append(f"CHANGELOG.md: section {match.group(1)} does not start a line with 'Chart X.Y.Z'")
        else:
            releases.append((match.group(1), match.group(2), chart.group(1)))
    for newer, older in zip(releases, releases[1:]):
        if not (semver(newer[0]) > semver(older[0]) and semver(newer[2]) > semver(older[2]) and newer[1] >= older[1]):
            errors.append(f"CHANGELOG.md: release {newer[0]} (chart {newer[2]}, {newer[1]}) does not follow "
                          f"{older[0]} (chart {older[2]}, {older[1]}): versions and dates must rise")
    if releases and semver(chart_version) < semver(releases[0][2]):
        errors.append(f"charts/ray-detect/Chart.yaml: version {chart_version} is older than chart "
                      f"{releases[0][2]} of release {releases[0][0]}")
    return errors, {version: chart for version, _, chart in releases}


def check(root: Path, tag: str | None = None, owner: str | None = None) -> list[str]:
    """Every disagreement, as one line each; empty when the tree (and the tag) agree."""
    app_version = tomllib.loads((root / "pyproject.toml").read_text())["project"]["version"]
    chart_version = read_chart_version(root)
    expected = {"app": app_version, "chart": chart_version}
    source = {"app": "pyproject.toml", "chart": "Chart.yaml"}
    errors = []
    for file, pattern, which, what in PLACES:
        found = re.findall(pattern, (root / file).read_text(), re.MULTILINE)
        if not found:
            errors.append(f"{file}: {what} not found (pattern {pattern!r})")
        for version in found:
            if version != expected[which]:
                errors.append(f"{file}: {what} is {version}, {source[which]} says {expected[which]}")
    changelog_problems, chart_of_release = changelog_errors((root / "CHANGELOG.md").read_text(), chart_version)
    errors += changelog_problems
    if tag is not None:
        if not re.fullmatch(rf"v{SEMVER}", tag):
            errors.append(f"tag {tag!r} is not vX.Y.Z")
        elif tag[1:] != app_version:
            errors.append(f"tag {tag} does not release pyproject.toml's version {app_version}")
        elif app_version not in chart_of_release:
            errors.append(f"CHANGELOG.md has no section ## [{app_version}] - YYYY-MM-DD naming its chart version")
        elif chart_of_release[app_version] != chart_version:
            errors.append(f"CHANGELOG.md: release {app_version} names chart {chart_of_release[app_version]}, "
                          f"Chart.yaml says {chart_version}")
    if owner is not None:
        values = (root / "charts/ray-detect/values.yaml").read_text()
        repository = re.search(r"^image:\n(?:  .*\n)*?  repository: (\S+)$", values, re.MULTILINE)
        wanted = f"ghcr.io/{owner.lower()}/ray-detect"
        if not repository or repository.group(1) != wanted:
            found = repository.group(1) if repository else None
            errors.append(f"charts/ray-detect/values.yaml: image.repository is {found}, the release pushes {wanted}")
    return errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="check-version", description=__doc__.splitlines()[0])
    parser.add_argument("--tag", help="a git tag to release, vX.Y.Z")
    parser.add_argument("--repository-owner", help="the GitHub owner the release pushes to ghcr.io/<owner>/")
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    errors = check(args.root, args.tag, args.repository_owner)
    for error in errors:
        print(f"check-version: {error}", file=sys.stderr)
    if errors:
        return 1
    app_version = tomllib.loads((args.root / "pyproject.toml").read_text())["project"]["version"]
    print(f"check-version: app {app_version}, chart {read_chart_version(args.root)}"
          + (f", tag {args.tag} may be released" if args.tag else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
