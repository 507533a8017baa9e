#!/usr/bin/env bash
# One prepared check for a GPU machine (under 8 minutes): the commands a user types there, with their
# defaults, then the resnet50 latency table.
#  - `cuda`-marked tests; one epoch of `rtk train` on CUDA in fp16 and bf16;
#  - `rtk export` of resnet50 (224 px, seeded weights) with its automatic verify (default runtimes);
#  - plain `rtk verify BUNDLE` (eager models on CPU and CUDA in one run); `rtk benchmark BUNDLE --device cuda`;
#  - `rtk serve --provider cuda` answering a tritonclient request (when the serve stack is importable:
#    carry the wheels of benchmarks/gpu_wheels.sh);
#  - resnet50 p50 and img/s at batch 1, 8, 32, 128: eager fp32, eager fp16 channels_last, onnxruntime CUDA
#    fp32/fp16, IO binding with and without CUDA graphs, TensorRT where the provider loads.
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
SECONDS=0

step "doctor"
rtk doctor --json > "$RES/gpu_doctor.json"
rtk doctor
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || { echo "no CUDA GPU here: nothing to check"; exit 2; }
GPU=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '-'))")
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true

step "cuda tests"
timeout 200 "$PY" -m pytest -q -m cuda -rs -p no:cacheprovider tests 2>&1 | tail -n 30 || fail "cuda tests"

step "rtk train on CUDA (1 epoch, digits 32 px): fp16 AMP, then bf16"
rtk data digits "$WORK/digits" --size 64 >/dev/null
for precision in fp16 bf16; do
  timeout 120 "$PY" -m toolkit train "$WORK/digits" --output "$WORK/train-$precision" --arch resnet18 --weights none \
    --image-size 32 --resize-size 32 --epochs 1 --no-hflip --device cuda --precision "$precision" --quiet \
    || fail "train $precision"
done

step "rtk export resnet50 (224 px, seeded weights) with its automatic verify: ONNX fp32 + fp16, TorchScript, pt2"
"$PY" -c "import torch, torchvision; torch.manual_seed(0); torch.save(torchvision.models.resnet50(num_classes=10).state_dict(), '$WORK/r50.pt')"
timeout 300 "$PY" -m toolkit export "$WORK/r50.pt" --arch resnet50 --num-classes 10 --image-size 224 --output "$WORK/r50" \
  --precision fp32 --precision fp16 --force || fail "export (with its automatic verify)"

step "plain rtk verify BUNDLE (default runtimes: eager on CPU and CUDA in one run)"
timeout 200 "$PY" -m toolkit verify "$WORK/r50" --json "$RES/gpu_verify-default-resnet50-$GPU.json" || fail "plain verify"

step "rtk benchmark BUNDLE --device cuda (defaults)"
timeout 200 "$PY" -m toolkit benchmark "$WORK/r50" --device cuda \
  --json "$RES/gpu_benchmark-default-resnet50-$GPU.json" || fail "benchmark --device cuda"
echo "elapsed ${SECONDS}s"

step "rtk serve --provider cuda, one tritonclient request"
if "$PY" -c "import fastapi, uvicorn, prometheus_client, tritonclient.http" 2>/dev/null; then
  timeout 150 "$PY" benchmarks/serve_check.py "$WORK/r50" --provider cuda --atol 1e-3 || fail "serve on CUDA"
else
  echo "not run: the serve stack is not importable here (carry the wheels of benchmarks/gpu_wheels.sh)"
fi

step "resnet50 table: batch 1 8 32 128"
timeout 240 "$PY" -m toolkit benchmark "$WORK/r50" --runtime eager-cuda --runtime eager-fp16 --runtime ort-cuda \
  --runtime ort-cuda-iobinding --batch-size 1 --batch-size 8 --batch-size 32 --batch-size 128 \
  --warmup 10 --iterations 30 --min-seconds 1 \
  --json "$RES/gpu-resnet50-$GPU.json" --markdown "$RES/gpu-resnet50-$GPU.md" || fail "benchmark table"
step "TensorRT (where the provider loads)"
timeout 120 "$PY" -m toolkit benchmark "$WORK/r50" --runtime ort-tensorrt --batch-size 1 --batch-size 8 \
  --batch-size 32 --batch-size 128 --warmup 10 --iterations 30 --min-seconds 1 \
  --json "$RES/gpu-tensorrt-resnet50-$GPU.json" || echo "(TensorRT: see the line above)"
step "IO binding with CUDA graphs (one input shape per run)"
for b in 1 8 32 128; do
  timeout 90 "$PY" -m toolkit benchmark "$WORK/r50" --runtime ort-cuda-iobinding --cuda-graph --batch-size "$b" \
    --warmup 10 --iterations 30 --min-seconds 1 --json "$RES/gpu-cudagraph-b$b-resnet50-$GPU.json" || fail "cuda graph b$b"
done

step "done (status $status, ${SECONDS}s)"
exit $status
