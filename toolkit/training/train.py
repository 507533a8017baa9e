"""Train stage: fine-tune a torchvision ResNet on an ImageFolder and write self-describing checkpoints."""

from __future__ import annotations

import csv
import io
import math
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from torchvision.transforms import v2 as T

from toolkit.core.fileio import check_writable_dir, write_json, write_text
from toolkit.core.hardware import cpu_info, usable_cpus
from toolkit.core.preprocess import PreprocessSpec
from toolkit.errors import RtkError
from toolkit.training.checkpoint import load_checkpoint, make_checkpoint, save_checkpoint
from toolkit.training.data import DatasetSplit, ImageDataset, discover
from toolkit.training.models import HEAD_PREFIX, build, check_arch, load_weights

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
BF16_CPU_BAD_GRAD_MAX_SIZE = 16  # images this small get wrong bf16 gradients on the CPU: see resolve_placement
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class TrainConfig:
    arch: str = "resnet18"
    weights: str = "DEFAULT"
    reset_head: bool = False
    epochs: int = 10
    batch_size: int = 64
    lr: float = 2e-3
    optimizer: str = "adamw"
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    freeze_backbone: bool = False
    unfreeze_at: int | None = None
    backbone_lr_scale: float = 1.0
    image_size: int = 224
    resize_size: int | None = None
    crop_scale: float = 0.35
    hflip: bool = True
    val_split: float = 0.2
    workers: int | None = None
    seed: int = 0
    precision: str = "auto"
    device: str = "auto"
    strict: bool = False

    def __post_init__(self) -> None:
        check_arch(self.arch)
        checks = [
            (self.epochs >= 1, f"--epochs must be at least 1, got {self.epochs}"),
            (self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}"),
            (self.lr > 0 and math.isfinite(self.lr), f"--lr must be a positive number, got {self.lr}"),
            (self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}"),
            (self.warmup_epochs >= 0, f"--warmup-epochs must be >= 0, got {self.warmup_epochs}"),
            (0 <= self.label_smoothing < 1, f"--label-smoothing must be in [0, 1), got {self.label_smoothing}"),
            (self.backbone_lr_scale >= 0, f"--backbone-lr-scale must be >= 0, got {self.backbone_lr_scale}"),
            (0 < self.crop_scale <= 1, f"--crop-scale must be in (0, 1], got {self.crop_scale}"),
            (self.image_size >= 16, f"--image-size must be at least 16, got {self.image_size}"),
            (self.optimizer in ("sgd", "adamw"), f"--optimizer must be sgd or adamw, got {self.optimizer}"),
            (self.precision in PRECISIONS, f"--precision must be one of {PRECISIONS}"),
            (self.device in DEVICES, f"--device must be one of {DEVICES}"),
            (self.workers is None or self.workers >= 0, "--workers must be >= 0"),
            (self.unfreeze_at is None or self.unfreeze_at >= 1, "--unfreeze-at is an epoch number from 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise RtkError(message)
        self.preprocess()  # validates resize vs crop

    def preprocess(self) -> PreprocessSpec:
        resize = self.resize_size or int(self.image_size / 0.875)
        return PreprocessSpec(resize_size=resize, crop_size=self.image_size)

    def backbone_frozen(self, epoch: int) -> bool:
        """Whether the backbone is frozen in (0-based) `epoch`."""
        return self.freeze_backbone and (self.unfreeze_at is None or epoch + 1 < self.unfreeze_at)


@dataclass(frozen=True)
class Placement:
    """Where and how training runs (device, precision, process rank), resolved from the config and the machine."""

    device: torch.device
    precision: str
    rank: int = 0
    world_size: int = 1

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_placement(config: TrainConfig) -> Placement:
    if config.device == "cuda" and not torch.cuda.is_available():
        raise RtkError("--device cuda, but torch.cuda.is_available() is False")
    use_cuda = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    precision = config.precision
    # Measured with torch 2.14 (oneDNN 3.12): on the CPU, the bf16 weight gradient of a 3x3 stride-2 conv over a
    # 1x1 feature map is garbage (uninitialised values, sometimes NaN). ResNet has such a conv when its input
    # is 16 px or smaller; the forward pass is right, so only training is affected.
    bf16_cpu_broken = config.image_size <= BF16_CPU_BAD_GRAD_MAX_SIZE
    if precision == "auto":
        precision = "fp16" if use_cuda else ("bf16" if cpu_info().fast_bf16 and not bf16_cpu_broken else "fp32")
    if precision == "fp16" and not use_cuda:
        raise RtkError("--precision fp16 needs CUDA; on CPU use bf16 or fp32")
    if precision == "bf16" and not use_cuda and bf16_cpu_broken:
        raise RtkError(f"--precision bf16 on the CPU computes wrong gradients for images of {BF16_CPU_BAD_GRAD_MAX_SIZE} px "
                       f"or less (oneDNN); use --precision fp32 or --image-size {BF16_CPU_BAD_GRAD_MAX_SIZE + 1} or more")
    return Placement(device=device, precision=precision, rank=rank, world_size=world)


def transforms(spec: PreprocessSpec, train: bool, crop_scale: float, hflip: bool) -> T.Compose:
    """torchvision transforms on PIL images: RandomResizedCrop (+flip) to train, Resize+CenterCrop to eval."""
    interp = T.InterpolationMode(spec.interpolation)
    if train:
        steps = [T.RandomResizedCrop(spec.crop_size, scale=(crop_scale, 1.0), interpolation=interp, antialias=True)]
        steps += [T.RandomHorizontalFlip()] if hflip else []
    else:
        steps = [T.Resize(spec.resize_size, interpolation=interp, antialias=True), T.CenterCrop(spec.crop_size)]
    return T.Compose(steps + [T.PILToTensor(), T.ToDtype(torch.float32, scale=True),
                              T.Normalize(list(spec.mean), list(spec.std))])


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up to the base rate, then cosine decay to zero."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def param_groups(model: nn.Module, config: TrainConfig) -> list[dict[str, Any]]:
    """Backbone and new head as separate groups so the backbone can learn slower (or not at all)."""
    head = [p for n, p in model.named_parameters() if n.startswith(HEAD_PREFIX)]
    backbone = [p for n, p in model.named_parameters() if not n.startswith(HEAD_PREFIX)]
    return [
        {"params": backbone, "lr": config.lr * config.backbone_lr_scale, "name": "backbone"},
        {"params": head, "lr": config.lr, "name": "head"},
    ]


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, config)
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=0.9, nesterov=True, weight_decay=config.weight_decay)
    return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)


def set_backbone_frozen(model: nn.Module, frozen: bool) -> None:
    for name, p in model.named_parameters():
        if not name.startswith(HEAD_PREFIX):
            p.requires_grad_(not frozen)


def set_train_mode(model: nn.Module, frozen_backbone: bool) -> None:
    """train() everywhere, except a frozen backbone stays in eval so its BatchNorm statistics hold."""
    model.train()
    if frozen_backbone:
        for name, module in model.named_children():
            if name != "fc":
                module.eval()


class Progress:
    """A one-line progress bar on a terminal; silent when stderr is not one."""

    def __init__(self, total: int, label: str, enabled: bool) -> None:
        self.total, self.label = total, label
        self.enabled = enabled and sys.stderr.isatty()
        self.last = 0.0

    def update(self, done: int, text: str) -> None:
        now = time.monotonic()
        if not self.enabled or (now - self.last < 0.2 and done < self.total):
            return
        self.last = now
        width = 24
        filled = int(width * done / max(1, self.total))
        sys.stderr.write(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} {text}   ")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\r" + " " * 100 + "\r")


def train_step(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, optimizer: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler, criterion: nn.Module, placement: Placement,
               memory_format: torch.memory_format = torch.channels_last) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """One optimisation step under the placement's autocast; returns (logits, loss, whether the step was applied).

    A step whose loss or gradients are not finite is skipped, so one bad batch cannot put NaN into the
    weights. fp16 leaves that to its GradScaler, whose skipped steps while it finds its scale are normal.
    """
    images = images.to(placement.device, non_blocking=True).contiguous(memory_format=memory_format)
    targets = targets.to(placement.device, non_blocking=True)
    buffers = [b.detach().clone() for b in model.buffers()]  # BatchNorm statistics: small, and a skip restores them
    with torch.autocast(placement.device.type, dtype=placement.autocast_dtype or torch.float32,
                        enabled=placement.autocast_dtype is not None):
        logits = model(images)
        loss = criterion(logits.float(), targets)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if scaler.is_enabled():
        scale = scaler.get_scale()
        scaler.step(optimizer)  # skips the update itself when the scaled gradients overflowed ...
        scaler.update()  # ... and then lowers the scale: that is how a skipped step shows
        applied = bool(torch.isfinite(loss)) and scaler.get_scale() >= scale
    else:
        # A NaN or inf anywhere makes the sum non-finite; summing is >10x cheaper than isfinite() per element.
        grad_sum = torch.stack([p.grad.sum() for p in model.parameters() if p.grad is not None]).sum()
        applied = bool(torch.isfinite(loss + grad_sum))
        if applied:
            optimizer.step()
    if not applied:
        with torch.no_grad():
            for buffer, saved in zip(model.buffers(), buffers):
                buffer.copy_(saved)
    return logits, loss, applied


def topk_correct(logits: torch.Tensor, targets: torch.Tensor, k: int) -> int:
    k = min(k, logits.shape[1])
    # the loader's targets stay on the host; the logits may be on the GPU
    return int((logits.topk(k, dim=1).indices == targets.to(logits.device)[:, None]).any(dim=1).sum())


@torch.inference_mode()
def evaluate(model: nn.Module, loader: DataLoader, placement: Placement) -> dict[str, float]:
    """Val loss, top-1 and top-5 in fp32 with the model in eval mode."""
    model.eval()
    loss_sum, top1, top5, n = 0.0, 0, 0, 0
    for images, targets in loader:
        images = images.to(placement.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        targets = targets.to(placement.device, non_blocking=True)
        logits = model(images).float()
        loss_sum += float(nn.functional.cross_entropy(logits, targets, reduction="sum"))
        top1 += topk_correct(logits, targets, 1)
        top5 += topk_correct(logits, targets, 5)
        n += len(targets)
    return {"val_loss": loss_sum / n, "val_top1": top1 / n, "val_top5": top5 / n}


def _loaders(split: DatasetSplit, config: TrainConfig, placement: Placement):
    spec = config.preprocess()
    train_set = ImageDataset(split.train, transforms(spec, True, config.crop_scale, config.hflip))
    val_set = ImageDataset(split.val, transforms(spec, False, config.crop_scale, config.hflip))
    workers = config.workers if config.workers is not None else min(4, max(0, usable_cpus() // 2 - 1))
    sampler = (DistributedSampler(train_set, num_replicas=placement.world_size, rank=placement.rank, seed=config.seed)
               if placement.world_size > 1 else None)
    generator = torch.Generator()
    common = {"num_workers": workers, "pin_memory": placement.device.type == "cuda", "persistent_workers": workers > 0}
    train_loader = DataLoader(train_set, batch_size=config.batch_size, shuffle=sampler is None, sampler=sampler,
                              drop_last=len(train_set) > config.batch_size * placement.world_size,
                              generator=generator, **common)
    val_loader = DataLoader(val_set, batch_size=max(config.batch_size, 64), shuffle=False, **common)
    return train_loader, val_loader, generator, sampler


def _history_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


@dataclass
class _Run:
    """What one training run works on: built once by `_prepare`, then advanced epoch by epoch."""

    config: TrainConfig
    placement: Placement
    split: DatasetSplit
    classes: list[str]
    loaded: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    criterion: nn.Module
    loaders: tuple[DataLoader, DataLoader, torch.Generator, DistributedSampler | None]
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] = field(default_factory=lambda: {"val_top1": -1.0})
    start_epoch: int = 0
    train_seconds: float = 0.0
    images_seen: int = 0

    @property
    def steps_per_epoch(self) -> int:
        return len(self.loaders[0])


def train(data: str | Path, output: str | Path, config: TrainConfig, resume: str | Path | None = None,
          echo: Callable[[str], None] = print, progress: bool = True, extend_to: int | None = None) -> dict[str, Any]:
    """Fine-tune, writing checkpoint.pt (best val top-1), last.pt, history.csv and metrics.json to `output`.

    With `resume`, the saved run continues with its own options to its planned epochs; `extend_to`
    (an explicit --epochs) may plan more. Everything that can fail on bad input is checked before the
    first file is written.
    """
    output = Path(output)
    check_writable_dir(output)
    state = _resume_state(resume, extend_to) if resume is not None else None
    if state is not None:
        config = replace(TrainConfig(**state["train_config"]), epochs=extend_to or state["train_config"]["epochs"])
    run = _prepare(data, config, state, resume)
    if run.placement.is_main:
        _announce(run, output, echo)
    wrapped, wrapped_frozen = run.model, None
    for epoch in range(run.start_epoch, config.epochs):
        frozen = config.backbone_frozen(epoch)
        if frozen != wrapped_frozen:
            wrapped, wrapped_frozen = _wrap(run, frozen), frozen
        row, improved = _train_epoch(run, wrapped, epoch, frozen, progress)
        if run.placement.is_main:
            _report_epoch(run, row, improved, echo)
            _write_checkpoints(run, output, epoch, improved)
    return _finish(run, output)


def _resume_state(resume: str | Path, extend_to: int | None) -> dict[str, Any]:
    """The saved run `resume` continues, checked before anything is built."""
    state = load_checkpoint(resume)
    if "training_state" not in state:
        raise RtkError(f"{resume} has no training state: resume from last.pt")
    if extend_to is not None and extend_to < state["epoch"]:
        raise RtkError(f"{resume} has already trained {state['epoch']} epochs; --epochs {extend_to} would undo them")
    return state


def _prepare(data: str | Path, config: TrainConfig, state: dict[str, Any] | None, resume: str | Path | None) -> _Run:
    """Data, model, optimiser, schedule and loaders on their device; a resumed run's state restored."""
    placement = resolve_placement(config)
    split = discover(data, config.val_split, config.seed, config.strict)
    classes = list(split.classes)
    if state is not None and state["classes"] != classes:
        raise RtkError(f"{resume} was trained on classes {state['classes']}, the data has {classes}")
    torch.manual_seed(config.seed)  # the new head's (or a from-scratch model's) initial weights
    model = build(config.arch, len(classes))
    loaded = "resumed from " + str(resume) if state else load_weights(model, config.arch, config.weights, config.reset_head)
    if state is not None:
        model.load_state_dict(state["state_dict"])
    if placement.world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if placement.device.type == "cuda" else "gloo")
    if placement.device.type == "cuda":
        torch.cuda.set_device(placement.device)
        torch.backends.cudnn.benchmark = True
    model = model.to(placement.device, memory_format=torch.channels_last)
    optimizer = make_optimizer(model, config)
    loaders = _loaders(split, config, placement)
    total_steps = len(loaders[0]) * config.epochs
    warmup_steps = int(round(config.warmup_epochs * len(loaders[0])))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup_steps, total_steps))
    scaler = torch.amp.GradScaler(placement.device.type, enabled=placement.precision == "fp16")
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    run = _Run(config, placement, split, classes, loaded, model, optimizer, scheduler, scaler, criterion, loaders)
    if state is not None:
        _restore(run, state)
    return run


def _restore(run: _Run, state: dict[str, Any]) -> None:
    ts = state["training_state"]
    run.optimizer.load_state_dict(ts["optimizer"])
    run.scheduler.load_state_dict(ts["scheduler"])
    run.scaler.load_state_dict(ts["scaler"])
    torch.set_rng_state(ts["torch_rng"])
    random.setstate(ts["python_rng"])
    run.history, run.best = list(ts["history"]), dict(ts["best"])
    run.start_epoch, run.train_seconds, run.images_seen = state["epoch"], ts["train_seconds"], ts["images_seen"]


def _announce(run: _Run, output: Path, echo: Callable[[str], None]) -> None:
    output.mkdir(parents=True, exist_ok=True)
    p = run.placement
    echo(f"training {run.config.arch} on {len(run.split.train)} images ({len(run.classes)} classes), validating on "
         f"{len(run.split.val)}; weights: {run.loaded}; {p.device} {p.precision}"
         + (f", {p.world_size} processes" if p.world_size > 1 else ""))
    for reason in run.split.skipped:
        echo(f"warning: skipped undecodable image {reason}")


def _wrap(run: _Run, frozen: bool) -> nn.Module:
    """The model as the step sees it: DDP only syncs parameters that required grad when it was built, so it
    is rebuilt on every (un)freeze."""
    set_backbone_frozen(run.model, frozen)
    p = run.placement
    if p.world_size == 1:
        return run.model
    return nn.parallel.DistributedDataParallel(run.model, device_ids=[p.device.index] if p.device.type == "cuda" else None)


def _train_epoch(run: _Run, wrapped: nn.Module, epoch: int, frozen: bool, progress: bool) -> tuple[dict[str, Any], bool]:
    """One epoch of steps, then validation: the epoch's history row, and whether it is the best so far."""
    config, p = run.config, run.placement
    train_loader, val_loader, generator, sampler = run.loaders
    # Seed from (seed, epoch) so a resumed run draws exactly what an uninterrupted one would.
    torch.manual_seed(config.seed * 1000 + epoch)
    random.seed(config.seed * 1000 + epoch)
    generator.manual_seed(config.seed * 1000 + epoch)
    if sampler is not None:
        sampler.set_epoch(epoch)
    set_train_mode(run.model, frozen)
    bar = Progress(run.steps_per_epoch, f"epoch {epoch + 1}/{config.epochs}", progress and p.is_main)
    loss_sum, correct, counted, seen, skipped = 0.0, 0, 0, 0, 0
    start = time.perf_counter()
    for step, (images, targets) in enumerate(train_loader):
        logits, loss, applied = train_step(wrapped, images, targets, run.optimizer, run.scaler, run.criterion, p)
        run.scheduler.step()
        seen += len(targets)
        if applied:  # the loss and accuracy of the steps that went into the weights
            loss_sum += float(loss.detach()) * len(targets)
            correct += topk_correct(logits.detach(), targets, 1)
            counted += len(targets)
        else:
            skipped += 1
        elapsed = time.perf_counter() - start
        bar.update(step + 1, f"loss {loss_sum / max(counted, 1):.4f} acc {correct / max(counted, 1):.3f} "
                             f"{seen * p.world_size / elapsed:.1f} img/s")
    if skipped == run.steps_per_epoch:
        raise RtkError(f"training diverged: every step of epoch {epoch + 1} had a non-finite loss or gradients; "
                       "lower --lr or use --precision fp32")
    if p.device.type == "cuda":
        torch.cuda.synchronize(p.device)
    seconds = time.perf_counter() - start
    bar.close()
    run.train_seconds += seconds
    run.images_seen += seen * p.world_size
    metrics = evaluate(run.model, val_loader, p)
    row = {"epoch": epoch + 1, "lr": run.scheduler.get_last_lr()[-1], "train_loss": loss_sum / counted,
           "train_top1": correct / counted, **metrics, "images_per_second": seen * p.world_size / seconds,
           "seconds": seconds, "backbone_frozen": frozen, "skipped_steps": skipped}
    run.history.append(row)
    improved = metrics["val_top1"] > run.best["val_top1"]
    if improved:
        run.best = {"val_top1": metrics["val_top1"], "val_top5": metrics["val_top5"], "epoch": epoch + 1}
    return row, improved


def _report_epoch(run: _Run, row: dict[str, Any], improved: bool, echo: Callable[[str], None]) -> None:
    skipped, steps = row["skipped_steps"], run.steps_per_epoch
    echo(f"epoch {row['epoch']}/{run.config.epochs}  train loss {row['train_loss']:.4f}  val loss {row['val_loss']:.4f}  "
         f"val top-1 {row['val_top1']:.4f}  top-5 {row['val_top5']:.4f}  "
         f"{row['images_per_second']:.1f} img/s  {row['seconds']:.1f}s" + ("  *best" if improved else "")
         + (f"  (skipped {skipped} of {steps} steps: non-finite loss or gradients)" if skipped else ""))


def _write_checkpoints(run: _Run, output: Path, epoch: int, improved: bool) -> None:
    """checkpoint.pt when the epoch is the best so far; last.pt (with what resuming needs) and history.csv always."""
    config, best = run.config, run.best
    summary = {"best_val_top1": best["val_top1"], "best_val_top5": best["val_top5"], "best_epoch": best["epoch"]}
    common = {"train_config": asdict(config), "metrics": summary, "epoch": epoch + 1}
    if improved:
        save_checkpoint(make_checkpoint(run.model, config.arch, run.classes, config.preprocess(), **common),
                        output / "checkpoint.pt")
    training_state = {
        "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict(), "torch_rng": torch.get_rng_state(), "python_rng": random.getstate(),
        "history": run.history, "best": best, "train_seconds": run.train_seconds, "images_seen": run.images_seen,
    }
    save_checkpoint(make_checkpoint(run.model, config.arch, run.classes, config.preprocess(), **common,
                                    training_state=training_state), output / "last.pt")
    write_text(output / "history.csv", _history_csv(run.history))


def _finish(run: _Run, output: Path) -> dict[str, Any]:
    """The run's summary (metrics.json on the main process); a distributed run's processes leave together."""
    best, p = run.best, run.placement
    result = {
        "best_val_top1": best["val_top1"], "best_val_top5": best["val_top5"], "best_epoch": best["epoch"],
        "epochs": run.config.epochs, "train_seconds": round(run.train_seconds, 3),
        "images_per_second": run.images_seen / run.train_seconds if run.train_seconds else 0.0,
        "final_val_top1": run.history[-1]["val_top1"], "precision": p.precision, "device": str(p.device),
        "world_size": p.world_size, "arch": run.config.arch, "classes": run.classes,
    }
    if p.world_size > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    if not p.is_main:
        return {**result, "rank": p.rank}
    write_json(output / "metrics.json", result)
    return result
