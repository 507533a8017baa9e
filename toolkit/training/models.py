"""Model builders and weights: every torchvision ResNet, pretrained or from a local file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn

from toolkit.core.preprocess import PreprocessSpec
from toolkit.errors import RtkError, first_line

CHECKPOINT_FORMAT = "rtk-checkpoint"


def torch_load(path: Path) -> Any:
    if not path.is_file():
        raise RtkError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise RtkError(f"cannot read {path} as a checkpoint (corrupt, or not a weights-only torch file): {first_line(exc)}") from None


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], str | None]:
    """A state dict from an rtk checkpoint or a plain state-dict file, with the arch when known."""
    path = Path(path)
    obj = torch_load(path)
    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        return obj["state_dict"], obj["arch"]
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return {k.removeprefix("module."): v for k, v in obj.items()}, None
    raise RtkError(f"{path} is neither an rtk checkpoint nor a state dict")


ARCHS = (
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "wide_resnet50_2", "wide_resnet101_2",
    "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d",
)
HEAD_PREFIX = "fc."


def check_arch(arch: str) -> str:
    if arch not in ARCHS:
        raise RtkError(f"unknown arch {arch!r}; choose from {', '.join(ARCHS)}")
    return arch


def build(arch: str, num_classes: int) -> nn.Module:
    """A randomly initialised torchvision ResNet with a `num_classes`-wide head."""
    if num_classes < 2:
        raise RtkError(f"a classifier needs at least two classes, got {num_classes}")
    return torchvision.models.get_model(check_arch(arch), weights=None, num_classes=num_classes)


def pretrained_weights(arch: str, name: str):
    """The torchvision weights enum member `name` (DEFAULT, IMAGENET1K_V1, ...) of `arch`."""
    enum = torchvision.models.get_model_weights(check_arch(arch))
    if name.upper() == "DEFAULT":
        return enum.DEFAULT
    try:
        return enum[name]
    except KeyError:
        raise RtkError(f"{arch} has no weights {name!r}; choose from DEFAULT, {', '.join(enum.__members__)}") from None


def cached_weights_path(weights) -> Path:
    """Where torch's hub cache looks for these weights ($TORCH_HOME/hub/checkpoints/<file>)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights.url).path)


def pretrained_state_dict(weights) -> dict[str, torch.Tensor]:
    """Load pretrained weights from torch's cache, downloading them if needed.

    Offline, the download fails: say where to put the file instead of a network traceback.
    """
    try:
        return weights.get_state_dict(progress=False)
    except Exception as exc:  # URLError, HTTPError, socket errors, a broken cached file
        raise RtkError(
            f"cannot load pretrained weights {weights} ({type(exc).__name__}: {exc}); offline, download "
            f"{weights.url} elsewhere and put it at {cached_weights_path(weights)}, or pass --weights PATH"
        ) from None


def weights_preprocess(weights) -> PreprocessSpec:
    """The eval preprocessing the pretrained weights were trained and measured with."""
    t = weights.transforms()
    return PreprocessSpec(
        resize_size=int(t.resize_size[0]),
        crop_size=int(t.crop_size[0]),
        mean=tuple(float(v) for v in t.mean),
        std=tuple(float(v) for v in t.std),
        interpolation=t.interpolation.value,
    )


def head_width(state_dict: dict[str, Any]) -> int | None:
    weight = state_dict.get("fc.weight")
    return int(weight.shape[0]) if isinstance(weight, torch.Tensor) else None


def load_weights(model: nn.Module, arch: str, source: str, reset_head: bool = False) -> str:
    """Fill `model` (built for its own class count) from `source`: none, DEFAULT, an enum name, or
    a path to a plain state dict or an rtk checkpoint. Returns a description of what was loaded."""
    if source.lower() == "none":
        return "random initialisation"
    num_classes = model.fc.out_features
    path = Path(source)
    if path.exists():
        state, file_arch = read_state_dict(path)
        if file_arch is not None and file_arch != arch:
            raise RtkError(f"{path} holds a {file_arch} checkpoint, but --arch is {arch}")
        origin = str(path)
    elif os.sep in source or source.endswith((".pt", ".pth", ".bin")):
        raise RtkError(f"weights file not found: {source}")
    else:
        weights = pretrained_weights(arch, source)
        state = pretrained_state_dict(weights)
        origin = str(weights)
        reset_head = True  # ImageNet's 1000-way head never fits a fine-tuning task
    width = head_width(state)
    if width is not None and width != num_classes:
        if not reset_head:
            raise RtkError(f"{origin} has {width} classes but the data has {num_classes}; "
                           "pass --reset-head to load all but the final fc layer")
    if reset_head:
        state = {k: v for k, v in state.items() if not k.startswith(HEAD_PREFIX)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (reset_head and k.startswith(HEAD_PREFIX))]
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise RtkError(f"{origin} does not fit {arch}: {detail} ({len(missing)} missing, {len(unexpected)} unexpected keys)")
    return origin + (" (fc reset)" if reset_head else "")
