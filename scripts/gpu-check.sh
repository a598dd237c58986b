#!/usr/bin/env bash
# Every GPU check of the project, for a machine with an NVIDIA GPU and a copy of the repository (prepare
# the Python packages such a machine lacks with `bash ../shared/gpu/bundle.sh`, then run this script there
# with the bundle: `bash .gpu-bundle/with-deps.sh bash scripts/gpu-check.sh [tests] [bench]`).
#   tests: the detector's and decoder's tests, CUDA-only ones included, and the app run once on the GPU;
#   bench: the GPU benchmark (model alone, DataLoader loop, tutorial, app): the heavy model at fp32 and
#          fp16, the light one at fp32, each in its own result file so that a run cut short keeps the rest.
# Logs and results go to $OUT (default: ./gpu-check).
set -uo pipefail
out="${OUT:-gpu-check}"
mkdir -p "$out"
stages="${*:-tests bench}"
if [[ " $stages " == *" tests "* ]]; then
  nvidia-smi > "$out/nvidia-smi.txt" 2>&1
  timeout 240 python3 -m pytest -q -p no:cacheprovider -rs tests/test_detector.py tests/test_decode.py 2>&1 | tee "$out/tests.log"
  timeout 120 python3 -m app inference=gpu model.weights=none output.path=/tmp/gpu-check-run 2>&1 | tee "$out/app.log"
fi
if [[ " $stages " == *" bench "* ]]; then
  heavy=fasterrcnn_resnet50_fpn_v2 light=fasterrcnn_mobilenet_v3_large_320_fpn
  timeout 200 python3 -m app.bench throughput --models $heavy --precisions fp32 --pause 1 --out "$out/bench-heavy-fp32.json" 2>&1 | tee "$out/bench.log"
  timeout 150 python3 -m app.bench throughput --models $light --precisions fp32 --pause 1 --out "$out/bench-light-fp32.json" 2>&1 | tee -a "$out/bench.log"
  timeout 150 python3 -m app.bench throughput --models $heavy --precisions fp16 --modes model app --pause 1 --out "$out/bench-heavy-fp16.json" 2>&1 | tee -a "$out/bench.log"
fi
