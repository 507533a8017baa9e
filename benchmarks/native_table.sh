#!/usr/bin/env bash
# Issue 28: resnet50 224 px (digits-trained, benchmarks/optimize_table.sh trains it), every CPU deployment incl. torch.compile,
# AOTInductor fp32 and PT2E int8: verified on the held-out images, then timed in one interleaved benchmark run.
set -euo pipefail
cd "$(dirname "$0")/.."
export TORCHINDUCTOR_CACHE_DIR=/tmp/r50-inductor
W=artifacts/bench
B=$W/native-resnet50
date
.venv/bin/rtk export $W/train-resnet50/checkpoint.pt --output $B --format onnx --format openvino --format aoti \
  --precision fp32 --precision int8 --calibration-data $W/digits/train --no-any-size --force --no-verify
date
.venv/bin/rtk verify $B --images $W/digits/val --runtime eager --runtime aoti --runtime ort-cpu --runtime openvino \
  --allow-native-code --json benchmarks/results/native-resnet50-verify.json > benchmarks/results/native-resnet50-verify.txt 2>&1 || true
date
.venv/bin/rtk benchmark $B --runtime eager --runtime torch-compile --runtime aoti --runtime ort-cpu --runtime openvino \
  --batch-size 1 --batch-size 8 --min-seconds 0.6 --rounds 6 --warmup 6 --allow-native-code \
  --json benchmarks/results/native-resnet50.json --markdown benchmarks/results/native-resnet50.md
date
