#!/usr/bin/env bash
# Makes docs/report.png: a real run of the app on the bundled photos (app/samples), its HTML report
# (`python -m app report`), and a screenshot of that page taken by headless Chromium.
#
# The run uses the tests' light model (tests/support/models.py: the light model's seeded random weights,
# calibrated on the same photos), not trained weights: it needs no download, and its boxes and labels show
# what a report looks like, not what a trained model finds. It takes a few minutes on 2 cores.
#
#   bash scripts/screenshot-report.sh [output.png]      (default: docs/report.png)
#
# Needs the project's virtual environment (.venv, or $PYTHON) and Chromium: `apt-get install -y chromium`
# on Debian and Ubuntu ($CHROMIUM names another binary).
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$(pwd)"
out="$(realpath -ms "${1:-docs/report.png}")"
python="$(realpath -ms "${PYTHON:-.venv/bin/python}")"
chromium="${CHROMIUM:-$(command -v chromium || command -v chromium-browser || true)}"

if [[ -z "$chromium" ]]; then
  echo "screenshot-report: Chromium not found. Install it (Debian/Ubuntu: sudo apt-get install -y chromium) or set CHROMIUM to its binary." >&2
  exit 2
fi
if [[ ! -x "$python" ]]; then
  echo "screenshot-report: $python not found: create the environment first (python3 -m venv .venv && .venv/bin/pip install -e '.[test]') or set PYTHON." >&2
  exit 2
fi

work="$(mktemp -d -t ray-detect-samples.XXXXXX)"
trap 'rm -rf "$work"' EXIT

# The tests' model: its checkpoint (made once, then reused) copied into the work folder, so that the
# report's heading names it plainly, and the overrides that select it.
mapfile -t model < <("$python" -c '
import shutil, sys
from tests.support.models import FAST_MODEL, LIGHT_CHECKPOINT, light_checkpoint
shutil.copyfile(light_checkpoint(), sys.argv[1] + "/tests-light-model.pt")
print("\n".join(item.replace(str(LIGHT_CHECKPOINT), "tests-light-model.pt") for item in FAST_MODEL))
' "$work")
if [[ ${#model[@]} == 0 ]]; then echo "screenshot-report: could not make the tests' model (see above)" >&2; exit 1; fi

# Run in the work folder, so that the report names its results folder `results`.
(cd "$work" && "$python" -m app data.path="$repo/app/samples" output.path=results "${model[@]}" \
  && "$python" -m app report results --out report)

# Chromium refuses to run as root without --no-sandbox; the page is a local file this script just wrote.
sandbox=()
if [[ "$(id -u)" == 0 ]]; then sandbox=(--no-sandbox); fi
"$chromium" --headless "${sandbox[@]}" --disable-gpu --hide-scrollbars --force-device-scale-factor=1 \
  --window-size=1000,1180 --screenshot="$work/page.png" "file://$work/report/index.html" 2> "$work/chromium.log" \
  || { cat "$work/chromium.log" >&2; exit 1; }

# A palette of 256 colours keeps the picture small enough to commit (the photos lose little at this size).
"$python" -c '
import sys
from PIL import Image
Image.open(sys.argv[1]).convert("RGB").quantize(256, dither=Image.Dither.NONE).save(sys.argv[2], optimize=True)
' "$work/page.png" "$out"
echo "screenshot-report: wrote $out ($(stat -c %s "$out") bytes)"
