#!/usr/bin/env bash
# Download the CRDs the chart tests validate against, for machines without ../shared beside the
# repository (the GitHub workflow): KubeRay v1.7.0's and prometheus-operator v0.93.0's, each checked
# against its SHA-256 (tests/test_release.py checks these hashes against the copies in ../shared).
#
#   bash scripts/get-crds.sh DIR    # -> DIR/kuberay-crds, DIR/prometheus-operator-crds
#   export KUBERAY_CRDS_DIR=DIR/kuberay-crds PROMETHEUS_OPERATOR_CRDS_DIR=DIR/prometheus-operator-crds
set -euo pipefail

dest="${1:?usage: get-crds.sh DIR}"
kuberay="https://raw.githubusercontent.com/ray-project/kuberay/v1.7.0/helm-chart/kuberay-operator/crds"
prometheus="https://raw.githubusercontent.com/prometheus-operator/prometheus-operator/v0.93.0/example/prometheus-operator-crd"

# folder, URL, SHA-256
files=(
  "kuberay-crds $kuberay/ray.io_rayclusters.yaml c44704442eef0c6721ad40c1d66782c8bd3fdab9d3344306a5820910a679baa1"
  "kuberay-crds $kuberay/ray.io_rayjobs.yaml 01a5cf3b17c1769fda44af7e82debcd98722f0c27b9ab84d084681c6649121f5"
  "kuberay-crds $kuberay/ray.io_rayservices.yaml 0a8fc325e6e22b9231c1f282b309555e2ecf94227ca20a03df3d1d9a403907ab"
  "kuberay-crds $kuberay/ray.io_raycronjobs.yaml 31c2c753bba01f7e8e89cb8e8c504131b58ee42090ca536d87f5ac27605a568e"
  "prometheus-operator-crds $prometheus/monitoring.coreos.com_podmonitors.yaml 45a93443daa687d3654f7e9631909ff7edcdf3ec09c5e60251b74aa2722aee5d"
  "prometheus-operator-crds $prometheus/monitoring.coreos.com_prometheusrules.yaml 78be98554b9c8506ab2b4f4feb91c5f3a56e536a0a510f3a8e876a459970d56d"
)

for entry in "${files[@]}"; do
  read -r folder url sha256 <<<"$entry"
  target="$dest/$folder/${url##*/}"
  mkdir -p "$dest/$folder"
  curl --fail --silent --show-error --location --retry 3 --output "$target" "$url"
  echo "$sha256  $target" | sha256sum --check --quiet
done
echo "get-crds: ${#files[@]} CRDs in $dest" >&2
