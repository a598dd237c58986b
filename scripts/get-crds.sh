#!/usr/bin/env bash
# Download the CRDs the chart tests validate against, for machines without ../shared beside the
# repository (scripts/test.sh calls it there): KubeRay v1.7.0's and prometheus-operator v0.93.0's, each
# checked against its SHA-256 (tests/test_release.py checks these hashes against the copies the tests read).
# A file already in DIR with the right SHA-256 is kept, so a second run needs no network.
#
#   bash scripts/get-crds.sh DIR    # -> DIR/kuberay-crds, DIR/prometheus-operator-crds
#   export KUBERAY_CRDS_DIR=DIR/kuberay-crds PROMETHEUS_OPERATOR_CRDS_DIR=DIR/prometheus-operator-crds
#
# Offline or air-gapped machines: copy the files somewhere reachable, laid out as
#   BASE/kuberay/ray.io_rayclusters.yaml, ...                     (the upstream file names)
#   BASE/prometheus-operator/monitoring.coreos.com_podmonitors.yaml, ...
# and set RAY_DETECT_CRDS_MIRROR=BASE (any URL curl reads: https://..., http://127.0.0.1:8000, file:///srv/crds).
# The SHA-256s are checked all the same.
set -euo pipefail

dest="${1:?usage: get-crds.sh DIR}"
mirror="${RAY_DETECT_CRDS_MIRROR:-}"
mirror="${mirror%/}"
kuberay="${mirror:+$mirror/kuberay}"
kuberay="${kuberay:-https://raw.githubusercontent.com/ray-project/kuberay/v1.7.0/helm-chart/kuberay-operator/crds}"
prometheus="${mirror:+$mirror/prometheus-operator}"
prometheus="${prometheus:-https://raw.githubusercontent.com/prometheus-operator/prometheus-operator/v0.93.0/example/prometheus-operator-crd}"

# folder, URL, SHA-256
files=(
  "kuberay-crds $kuberay/ray.io_rayclusters.yaml c44704442eef0c6721ad40c1d66782c8bd3fdab9d3344306a5820910a679baa1"
  "kuberay-crds $kuberay/ray.io_rayjobs.yaml 01a5cf3b17c1769fda44af7e82debcd98722f0c27b9ab84d084681c6649121f5"
  "kuberay-crds $kuberay/ray.io_rayservices.yaml 0a8fc325e6e22b9231c1f282b309555e2ecf94227ca20a03df3d1d9a403907ab"
  "kuberay-crds $kuberay/ray.io_raycronjobs.yaml 31c2c753bba01f7e8e89cb8e8c504131b58ee42090ca536d87f5ac27605a568e"
  "prometheus-operator-crds $prometheus/monitoring.coreos.com_podmonitors.yaml 45a93443daa687d3654f7e9631909ff7edcdf3ec09c5e60251b74aa2722aee5d"
  "prometheus-operator-crds $prometheus/monitoring.coreos.com_prometheusrules.yaml 78be98554b9c8506ab2b4f4feb91c5f3a56e536a0a510f3a8e876a459970d56d"
)

fetched=0
for entry in "${files[@]}"; do
  read -r folder url sha256 <<<"$entry"
  target="$dest/$folder/${url##*/}"
  if echo "$sha256  $target" | sha256sum --check --status 2>/dev/null; then
    continue  # already here, and whole
  fi
  mkdir -p "$dest/$folder"
  curl --fail --silent --show-error --location --retry 3 --output "$target" "$url"
  if ! echo "$sha256  $target" | sha256sum --check --quiet; then
    rm -f "$target"
    echo "get-crds: $url is not the file this script expects (SHA-256 $sha256)" >&2
    exit 1
  fi
  fetched=$((fetched + 1))
done
echo "get-crds: ${#files[@]} CRDs in $dest ($fetched downloaded)" >&2
