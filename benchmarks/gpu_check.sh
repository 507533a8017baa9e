#!/usr/bin/env bash
# One prepared check for a GPU machine (under 8 minutes): the `cuda` tests, a few training steps on
# CUDA (fp16 AMP and bf16), resnet50 exported to ONNX fp32/fp16 + TorchScript + pt2, `rtk verify`
# on every CUDA runtime, and `rtk benchmark` at batch 1, 8, 32, 128 on every CUDA runtime.
# Logs and JSON go to $OUT when set (the device tool's folder), else benchmarks/results/.
#
#   bash benchmarks/gpu_check.sh                     # with the project's .venv ("[gpu,dev]" extras)
#   PYTHONPATH=. bash benchmarks/gpu_check.sh        # on a machine whose Python already has the deps
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHONPATH:-}" ] && PY=.venv/bin/python
export PYTHONPATH=.:${PYTHONPATH:-} PYTHONUNBUFFERED=1
RES=${OUT:-benchmarks/results}
WORK=${WORK:-$(mktemp -d /tmp/rtk-gpu.XXXX)}
mkdir -p "$RES" "$WORK"
exec > >(tee "$RES/gpu_check.log") 2>&1
rtk() { "$PY" -m toolkit "$@"; }
step() { echo; echo "=== $(date +%T) $*"; }
status=0
fail() { echo "FAILED: $*"; status=1; }

step "doctor"
rtk doctor --json > "$RES/gpu_doctor.json"
rtk doctor
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || { echo "no CUDA GPU here: nothing to check"; exit 2; }
GPU=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '-'))")

step "cuda tests"
timeout 240 "$PY" -m pytest -q -m cuda -rs -p no:cacheprovider tests 2>&1 | tail -n 25 || fail "cuda tests"

step "training on CUDA (1 epoch, digits 32 px, fp16 AMP then bf16)"
rtk data digits "$WORK/digits" --size 64 >/dev/null
for precision in fp16 bf16; do
  timeout 120 "$PY" -m toolkit train "$WORK/digits" --output "$WORK/train-$precision" --arch resnet18 --weights none \
    --image-size 32 --resize-size 32 --epochs 1 --no-hflip --device cuda --precision "$precision" --quiet \
    || fail "train $precision"
done

step "export resnet50 (224 px, seeded weights): ONNX fp32 + fp16, TorchScript, pt2"
"$PY" -c "import torch, torchvision; torch.manual_seed(0); torch.save(torchvision.models.resnet50(num_classes=10).state_dict(), '$WORK/r50.pt')"
timeout 240 "$PY" -m toolkit export "$WORK/r50.pt" --arch resnet50 --num-classes 10 --image-size 224 --output "$WORK/r50" \
  --precision fp32 --precision fp16 --force --no-verify || fail "export"

step "verify on every CUDA runtime (digits val, 359 images)"
timeout 240 "$PY" -m toolkit verify "$WORK/r50" --images "$WORK/digits/val" --device cuda \
  --runtime eager-cuda --runtime eager-fp16 --runtime torchscript-cuda --runtime torch-export-cuda \
  --json "$RES/gpu_verify-resnet50-$GPU.json" || fail "verify torch CUDA runtimes"
timeout 240 "$PY" -m toolkit verify "$WORK/r50" --images "$WORK/digits/val" --device cuda \
  --json "$RES/gpu_verify-all-resnet50-$GPU.json" || fail "verify every CUDA runtime (onnxruntime included)"

step "benchmark resnet50 on every CUDA runtime, batch 1 8 32 128"
timeout 300 "$PY" -m toolkit benchmark "$WORK/r50" --device cuda --batch-size 1 --batch-size 8 --batch-size 32 --batch-size 128 \
  --warmup 10 --iterations 30 --min-seconds 1 \
  --json "$RES/gpu-resnet50-$GPU.json" --markdown "$RES/gpu-resnet50-$GPU.md" || fail "benchmark"

step "done (status $status)"
exit $status
