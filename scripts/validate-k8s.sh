#!/usr/bin/env bash
# Render and check everything under k8s/, as the tests do:
#   - every kustomization (k8s/base, k8s/overlays/*) with `kubectl kustomize --enable-helm` and helm v3;
#   - KubeRay objects (rendered RayClusters, k8s/rayjob.yaml) strictly against the KubeRay CRDs
#     ($KUBERAY_CRDS_DIR, else ../shared/kuberay-crds, else .crds/kuberay-crds), and every pod template against the
#     restricted Pod Security Standard;
#   - each Argo CD Application in k8s/argocd/ against the overlay it deploys.
# Prints one line per rendered folder or file, then every error; exits 1 if there is one.
# kubectl and helm: from PATH, else .tools/ (scripts/get-k8s-tools.sh is run when they are missing).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python="${PYTHON:-.venv/bin/python}"
exec "$python" -m tests.support.k8s_validation k8s
