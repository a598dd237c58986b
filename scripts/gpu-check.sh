#!/usr/bin/env bash
# Every GPU check of the project in one go, for a machine with an NVIDIA GPU and a copy of the repository
# (prepare the Python packages such a machine lacks with `bash ../shared/gpu/bundle.sh`, then run this
# script there with the bundle: `bash .gpu-bundle/with-deps.sh bash scripts/gpu-check.sh`).
#   1. the detector's tests, CUDA-only ones included;
#   2. the GPU benchmark: model alone, DataLoader loop, tutorial and app, fp32 and fp16, both models.
# Logs and results go to $OUT (default: ./gpu-check).
set -uo pipefail
out="${OUT:-gpu-check}"
mkdir -p "$out"
nvidia-smi > "$out/nvidia-smi.txt" 2>&1
python3 -m pytest -q -p no:cacheprovider tests/test_detector.py tests/test_decode.py 2>&1 | tee "$out/tests.log"
python3 -m app.bench throughput --precisions fp32 fp16 --pause 2 --out "$out/results-gpu.json" 2>&1 | tee "$out/bench.log"
