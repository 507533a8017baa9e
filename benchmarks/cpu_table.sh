#!/usr/bin/env bash
# CPU latency table for resnet18 and resnet50 at 224 px, batch 1 and 8, one run:
# eager fp32, eager-bf16, torchscript, torch-export, ort-cpu fp32 and int8.
# Models are untrained (seeded) ResNets with a 10-class head; int8 is calibrated on the digits.
# Usage: bash benchmarks/cpu_table.sh   (from the repo root, with .venv set up by `make install`)
set -euo pipefail
cd "$(dirname "$0")/.."
RTK=${RTK:-.venv/bin/rtk}
PY=${PY:-.venv/bin/python}
WORK=${WORK:-artifacts/bench}
RESULTS=${RESULTS:-benchmarks/results}
TAG=${TAG:-$(hostname -s)}
MIN_SECONDS=${MIN_SECONDS:-3}
mkdir -p "$WORK" "$RESULTS"
[ -d "$WORK/digits" ] || $RTK data digits "$WORK/digits" --size 64
for arch in resnet18 resnet50; do
  $PY -c "import torch, torchvision; torch.manual_seed(0); torch.save(torchvision.models.get_model('$arch', num_classes=10).state_dict(), '$WORK/$arch.pt')"
  time $RTK export "$WORK/$arch.pt" --arch "$arch" --num-classes 10 --image-size 224 --output "$WORK/$arch" \
    --format onnx --format torchscript --format pt2 --precision fp32 --precision int8 \
    --calibration-data "$WORK/digits/train" --calibration-size 100 --force --no-verify
  $RTK benchmark "$WORK/$arch" --runtime eager --runtime eager-bf16 --runtime torchscript --runtime torch-export \
    --runtime ort-cpu --batch-size 1 --batch-size 8 --warmup 10 --iterations 30 --min-seconds "$MIN_SECONDS" \
    --json "$RESULTS/cpu-$arch-$TAG.json" --markdown "$RESULTS/cpu-$arch-$TAG.md"
done
