#!/usr/bin/env bash
# The fastest verified CPU deployment of digits-trained resnet50 and resnet18 (224 px), in one run each:
# train (4 epochs, from scratch: no pretrained weights offline), export every format, then `rtk optimize` at
# batch 1 and 8 (every candidate verified on the 359 held-out images, timed in interleaved rounds), then the
# CPU's matmul peak and OpenVINO's benchmark_app on the same files (benchmarks/cpu_peak.py).
# Usage: bash benchmarks/optimize_table.sh   (from the repo root, after `make install`)
#        ARCHS=resnet50 TAG=epyc-zen5-2cpu bash benchmarks/optimize_table.sh
set -euo pipefail
cd "$(dirname "$0")/.."
RTK=${RTK:-.venv/bin/rtk}
PY=${PY:-.venv/bin/python}
WORK=${WORK:-artifacts/bench}
RESULTS=${RESULTS:-benchmarks/results}
TAG=${TAG:-$($PY -c "from toolkit.core.hardware import cpu_info; print(cpu_info().tag)")}
ARCHS=${ARCHS:-resnet50 resnet18}
mkdir -p "$WORK" "$RESULTS"
[ -d "$WORK/digits" ] || $RTK data digits "$WORK/digits" --size 256
for arch in $ARCHS; do
  [ -f "$WORK/train-$arch/checkpoint.pt" ] || $RTK train "$WORK/digits" --output "$WORK/train-$arch" --arch "$arch" \
    --weights none --image-size 224 --epochs 4 --batch-size 32 --no-hflip --quiet
  $RTK export "$WORK/train-$arch/checkpoint.pt" --output "$WORK/opt-$arch" --format onnx --format torchscript \
    --format pt2 --format openvino --precision fp32 --precision int8 --calibration-data "$WORK/digits/train" \
    --force --no-verify
  $RTK optimize "$WORK/opt-$arch" --calibration-data "$WORK/digits" --batch-size 1 --batch-size 8 \
    --markdown "$RESULTS/optimize-$arch-$TAG.md" --json "$RESULTS/optimize-$arch-$TAG.json"
  [ "$arch" != resnet50 ] || $PY benchmarks/cpu_peak.py "$WORK/opt-$arch" --tag "$TAG"
done
