#!/usr/bin/env bash
# Every GPU check of the project, for a machine with an NVIDIA GPU and a copy of the repository (prepare
# the Python packages such a machine lacks with `bash ../shared/gpu/bundle.sh`, then run this script there
# with the bundle: `bash .gpu-bundle/with-deps.sh bash scripts/gpu-check.sh [tests] [bench] [long]`).
#   tests: the device, detector, decoder and precision tests, CUDA-only ones included (among them:
#          fp16/bf16 detections on the GPU against fp32 within test_precision's bound), and the app run
#          once on the GPU at fp16, once calibrating its batch size (the trials in $OUT/batch-sizes.json) and
#          once tiled (tiles are strided views staged through the pinned buffer);
#   bench: the GPU benchmark: the heavy model at fp16 (model alone, DataLoader loop, app) on 600 images,
#          the baselines at batch 8 and 16, 3 repeats each, then the app with two actors per GPU and the app
#          with channels-last weights and cuDNN autotuning (docs/performance.md); with "long" also the heavy
#          model at fp32 and the light one at fp32 in every mode, each
#          in its own result file so that a run cut short keeps the rest.
# One line per check, "PASS <check>: ..." or "FAIL <check>: ...", goes to stdout and $OUT/summary.txt;
# logs and results go to $OUT (default: ./gpu-check). Exits 1 when any check failed.
set -uo pipefail
out="${OUT:-gpu-check}"
mkdir -p "$out"
stages="${*:-tests bench}"
failed=0

# report <check> <exit code> <what passed> <what failed>
report() {
  local line
  if [[ "$2" == 0 ]]; then line="PASS $1: $3"; else line="FAIL $1: $4 (exit $2)"; failed=1; fi
  echo "$line" | tee -a "$out/summary.txt"
}

# The last line pytest prints: "N passed, M skipped, K deselected in T s".
pytest_counts() { grep -E '[0-9]+ (passed|failed|skipped|errors?|deselected).* in [0-9.]+s' "$1" | tail -1 | tr -d '='; }

if [[ " $stages " == *" tests "* ]]; then
  nvidia-smi > "$out/nvidia-smi.txt" 2>&1
  report nvidia-smi $? "$(grep -m1 -o 'Driver Version: [0-9.]*' "$out/nvidia-smi.txt")" "no NVIDIA driver answered"

  timeout 120 python3 -m pytest -q -p no:cacheprovider -rs -m "not cuda" tests/test_device.py tests/test_detector.py \
    tests/test_decode.py tests/test_precision.py > "$out/tests.log" 2>&1
  report tests $? "$(pytest_counts "$out/tests.log")" "$(pytest_counts "$out/tests.log"); see tests.log"

  # The CUDA-only tests on their own line: with no CUDA they skip, which is a failure here.
  timeout 150 python3 -m pytest -q -p no:cacheprovider -rs -rP -m cuda tests/test_detector.py tests/test_precision.py \
    > "$out/cuda-tests.log" 2>&1
  code=$?
  if [[ $code == 0 ]] && grep -q "skipped" <(pytest_counts "$out/cuda-tests.log"); then code=5; fi
  report cuda-tests $code "$(pytest_counts "$out/cuda-tests.log") (fp16/bf16 within the bound on the GPU)" \
    "$(pytest_counts "$out/cuda-tests.log"); see cuda-tests.log"

  timeout 90 python3 -m app inference=gpu inference.precision=fp16 model.weights=none \
    output.path=/tmp/gpu-check-run > "$out/app.log" 2>&1
  code=$?
  devices=$(grep -o 'devices: .*;' "$out/app.log" | head -1)
  if [[ $code == 0 && "$devices" != *cuda:* ]]; then code=6; fi
  report app-on-gpu $code "$devices" "the app did not run on the GPU: $(tail -1 "$out/app.log")"

  # The batch size calibrated on this GPU (fp16, up to 32): the actor's trials and choice, from its cache file.
  timeout 120 python3 -m app inference=gpu inference.precision=fp16 model.weights=none inference.calibrate_batch_size=true \
    inference.calibration_cache="$out/batch-sizes.json" output.path=/tmp/gpu-check-calibrated > "$out/app-calibrated.log" 2>&1
  code=$?
  calibrated=$(python3 -c "import json, sys; [print(key, '->', entry['batch_size'], entry['trials']) for key, entry in json.load(open(sys.argv[1])).items()]" \
    "$out/batch-sizes.json" 2>&1)
  if [[ $code == 0 && "$calibrated" != cuda:* ]]; then code=8; fi
  report calibration-on-gpu $code "$calibrated" "no calibration on the GPU: $(tail -1 "$out/app-calibrated.log") $calibrated"

  # Tiled on the GPU: the samples cut into 256-px tiles, each a strided view staged through the pinned buffer.
  timeout 90 python3 -m app inference=gpu tiling=tiles tiling.tile_size=256 model.weights=none \
    output.path=/tmp/gpu-check-tiled > "$out/app-tiled.log" 2>&1
  code=$?
  devices=$(grep -o 'devices: .*;' "$out/app-tiled.log" | head -1)
  tiles=$(python3 -c "import glob, pyarrow.parquet as pq; print(*pq.read_table(glob.glob('/tmp/gpu-check-tiled/part-*.parquet')).column('num_tiles').to_pylist())" 2>&1)
  if [[ $code == 0 && ( "$devices" != *cuda:* || ! "$tiles" =~ ^[0-9]+( [0-9]+){3}$ ) ]]; then code=7; fi
  report app-tiled-on-gpu $code "$devices tiles per image: $tiles" "the tiled app did not run on the GPU: $(tail -1 "$out/app-tiled.log") tiles: $tiles"
fi

if [[ " $stages " == *" bench "* ]]; then
  heavy=fasterrcnn_resnet50_fpn_v2 light=fasterrcnn_mobilenet_v3_large_320_fpn
  bench() {  # bench <name> <timeout> <args...>
    local name=$1 limit=$2
    shift 2
    timeout "$limit" python3 -m app.bench throughput "$@" --pause 1 --out "$out/$name.json" >> "$out/bench.log" 2>&1
    report "$name" $? "results in $name.json" "see bench.log"
  }
  bench bench-heavy-fp16 240 --models $heavy --precisions fp16 --modes model dataloader app --count 600 --baseline-batch-sizes 8 16 --repeats 3
  # Two detector actors per GPU (inference.actors_per_gpu=2) against the one-actor app figures above.
  bench bench-heavy-fp16-two-actors 150 --models $heavy --precisions fp16 --modes app --count 600 --repeats 3 --actors-per-gpu 2
  # Channels-last weights and cuDNN's autotuning (inference.channels_last, inference.cudnn_benchmark) against the same.
  bench bench-heavy-fp16-channels-last 150 --models $heavy --precisions fp16 --modes app --count 600 --repeats 3 \
    --app-overrides inference.channels_last=true inference.cudnn_benchmark=true
  [[ " $stages " == *" long "* ]] || exit $failed
  bench bench-heavy-fp32 200 --models $heavy --precisions fp32 --count 300 --baseline-batch-sizes 8 --repeats 2
  bench bench-light-fp32 150 --models $light --precisions fp32 --count 300 --baseline-batch-sizes 16 --repeats 2
fi
exit $failed
