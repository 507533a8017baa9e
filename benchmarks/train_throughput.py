"""Training images/s at 224 px, batch 32: plain fp32 (NCHW) against `--precision auto` with channels_last.

Uses the same `toolkit.training.train.train_step` as `rtk train`, on synthetic batches so only the model's
work is measured (no decoding). Usage:

    python benchmarks/train_throughput.py [--archs resnet18 resnet50] [--steps 4] [--markdown PATH]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch import nn

from toolkit.evaluation.env import cpu_info, environment
from toolkit.training.models import build
from toolkit.training.train import TrainConfig, make_optimizer, resolve_placement, train_step


def measure(arch: str, precision: str, channels_last: bool, batch: int, size: int, steps: int, warmup: int) -> float:
    torch.manual_seed(0)
    config = TrainConfig(arch=arch, weights="none", precision=precision, device="auto")
    placement = resolve_placement(config)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = build(arch, 10).to(placement.device, memory_format=fmt).train()
    optimizer = make_optimizer(model, config)
    scaler = torch.amp.GradScaler(placement.device.type, enabled=placement.precision == "fp16")
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    images = torch.randn(batch, 3, size, size)
    targets = torch.randint(0, 10, (batch,))
    for i in range(warmup + steps):
        if i == warmup:
            if placement.device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        train_step(model, images, targets, optimizer, scaler, criterion, placement, memory_format=fmt)
    if placement.device.type == "cuda":
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - start), placement.precision


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", default=["resnet18", "resnet50"])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--json", default=None)
    parser.add_argument("--markdown", default=None)
    args = parser.parse_args()
    rows = []
    for arch in args.archs:
        base, _ = measure(arch, "fp32", False, args.batch_size, args.image_size, args.steps, args.warmup)
        fast, precision = measure(arch, "auto", True, args.batch_size, args.image_size, args.steps, args.warmup)
        rows.append({"arch": arch, "fp32_images_per_second": base, "auto_precision": precision,
                     "auto_images_per_second": fast, "speedup": fast / base})
        print(f"{arch}: fp32 {base:.1f} img/s, auto ({precision}, channels_last) {fast:.1f} img/s, {fast / base:.2f}x", flush=True)
    cpu = cpu_info()
    lines = [f"# Training throughput, {args.image_size} px, batch {args.batch_size}", "",
             f"CPU: {cpu.name}, {cpu.usable_cpus} usable CPUs, AMX {cpu.amx}, AVX512-BF16 {cpu.avx512_bf16}; "
             f"torch {torch.__version__}; {args.steps} timed steps after {args.warmup} warm-up.", "",
             "Command: `python benchmarks/train_throughput.py`", "",
             "| arch | fp32 NCHW img/s | auto precision | auto + channels_last img/s | speedup |", "|---|---|---|---|---|"]
    lines += [f"| {r['arch']} | {r['fp32_images_per_second']:.1f} | {r['auto_precision']} | {r['auto_images_per_second']:.1f} | "
              f"{r['speedup']:.2f}x |" for r in rows]
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write("\n".join(lines) + "\n")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"environment": environment(), "config": vars(args), "results": rows}, fh, indent=2)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
