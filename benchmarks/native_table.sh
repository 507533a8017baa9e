#!/usr/bin/env bash
# Issues 28 and 30: resnet50 224 px (digits-trained from scratch), every CPU deployment incl. torch.compile,
# AOTInductor fp32 / bf16 (where the CPU has bf16 units) and PT2E int8, in two runs on the same bundle:
#  1. `rtk optimize --allow-native-code`: builds the int8 variants, NNCF IRs and AOTInductor packages the bundle
#     lacks, verifies every candidate on the 359 held-out images, times those that pass in interleaved rounds
#     (b1, b8) and recommends the fastest; its table ranks them, its footer gives the recommendation against
#     eager, onnxruntime's and OpenVINO's defaults and the fastest PyTorch-native candidate;
#  2. `rtk benchmark` on the peers the issue names (failed ones too, which optimize does not time), in one
#     interleaved run, the recommended runner marked.
# Usage: bash benchmarks/native_table.sh   (from the repo root, after `make install`; ~40 min on 2 CPUs)
set -euo pipefail
cd "$(dirname "$0")/.."
RTK=${RTK:-.venv/bin/rtk}
PY=${PY:-.venv/bin/python}
W=${WORK:-artifacts/bench}
R=${RESULTS:-benchmarks/results}
B=$W/native-resnet50
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/r50-inductor}
TAG=${TAG:-$($PY -c "from toolkit.core.hardware import cpu_info; print(cpu_info().tag)")}
mkdir -p "$W" "$R"
[ -d "$W/digits" ] || $RTK data digits "$W/digits" --size 256
[ -f "$W/train-resnet50/checkpoint.pt" ] || $RTK train "$W/digits" --output "$W/train-resnet50" --arch resnet50 \
  --weights none --image-size 224 --epochs 4 --batch-size 32 --no-hflip --quiet
date
$RTK export "$W/train-resnet50/checkpoint.pt" --output "$B" --format onnx --format openvino --format torchscript \
  --format pt2 --precision fp32 --precision int8 --calibration-data "$W/digits/train" --no-any-size --force --no-verify
date
$RTK optimize "$B" --calibration-data "$W/digits" --batch-size 1 --batch-size 8 --allow-native-code \
  --markdown "$R/native-optimize-resnet50-$TAG.md" --json "$R/native-optimize-resnet50-$TAG.json"
date
# the peers of issue 28's table, plus whatever optimize recommended
ARTIFACTS=$($PY - "$B" <<'EOF'
import json, sys
from pathlib import Path
manifest = json.loads((Path(sys.argv[1]) / "manifest.json").read_text())
peers = ["model.onnx", "model.int8.onnx", "model.openvino.xml", "model.openvino-int8.xml", "model.openvino-int8-ac.xml",
         "model.aoti.pt2", "model.aoti-bf16.pt2", "model.aoti-int8.pt2", manifest["recommended"]["artifact"]]
print(" ".join(f"--artifact {name}" for name in dict.fromkeys(peers) if name in manifest["files"]))
EOF
)
# the bf16 runtimes exist only on a CPU with bf16 units (named explicitly, they would be an error elsewhere)
BF16=$($PY -c "from toolkit.core.hardware import cpu_info; print('--runtime eager-bf16 --runtime openvino-bf16' if cpu_info().fast_bf16 else '')")
# shellcheck disable=SC2086
$RTK benchmark "$B" --runtime eager --runtime torch-compile --runtime aoti --runtime ort-cpu --runtime openvino $BF16 $ARTIFACTS --batch-size 1 --batch-size 8 --min-seconds 2 --rounds 10 \
  --allow-native-code --json "$R/native-resnet50-$TAG.json" --markdown "$R/native-resnet50-$TAG.md" || true
date
