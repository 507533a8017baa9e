#!/usr/bin/env bash
# The fastest verified CPU deployment of digits-fine-tuned resnet50 and resnet18 (224 px), in one run:
# train (4 epochs, from scratch: no pretrained weights offline), export, then `rtk optimize` at batch 1 and 8.
# Usage: bash benchmarks/optimize_table.sh   (from the repo root, after `make install`)
set -euo pipefail
cd "$(dirname "$0")/.."
RTK=${RTK:-.venv/bin/rtk}
WORK=${WORK:-artifacts/bench}
RESULTS=${RESULTS:-benchmarks/results}
TAG=${TAG:-$(hostname -s)}
mkdir -p "$WORK" "$RESULTS"
[ -d "$WORK/digits" ] || $RTK data digits "$WORK/digits" --size 64
for arch in resnet50 resnet18; do
  [ -f "$WORK/train-$arch/checkpoint.pt" ] || $RTK train "$WORK/digits" --output "$WORK/train-$arch" --arch "$arch" \
    --weights none --image-size 224 --resize-size 256 --epochs 4 --no-hflip --quiet --workers 0
  $RTK export "$WORK/train-$arch/checkpoint.pt" --output "$WORK/opt-$arch" --precision fp32 --precision int8 \
    --calibration-data "$WORK/digits/train" --force --no-verify
  $RTK optimize "$WORK/opt-$arch" --calibration-data "$WORK/digits" --batch-size 1 --batch-size 8 \
    --markdown "$RESULTS/optimize-$arch-$TAG.md" --json "$RESULTS/optimize-$arch-$TAG.json"
done
