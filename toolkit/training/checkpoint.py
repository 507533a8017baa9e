"""Self-describing checkpoints: weights plus everything a later stage needs to use them.

A checkpoint holds only tensors and plain Python values, so `torch.load(weights_only=True)` reads
it and an untrusted file cannot run code.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from toolkit.core.fileio import atomic_path, sha256_file, writer_file
from toolkit.core.manifest import Manifest
from toolkit.core.preprocess import PreprocessSpec
from toolkit.core.versions import library_versions
from toolkit.errors import RtkError
from toolkit.training.models import CHECKPOINT_FORMAT, build, check_arch, read_state_dict, torch_load

FORMAT = CHECKPOINT_FORMAT
VERSION = 1
RUN_FILES = ("checkpoint.pt", "last.pt", "history.csv", "metrics.json")  # what `rtk train` writes in its folder


def make_checkpoint(model: nn.Module, arch: str, classes: list[str] | tuple[str, ...], preprocess: PreprocessSpec,
                    **extra: Any) -> dict[str, Any]:
    """A checkpoint dict; `extra` adds train_config, metrics, epoch, training_state, ..."""
    state = {k: v.detach().cpu().contiguous() for k, v in unwrap(model).state_dict().items()}
    return {
        "format": FORMAT,
        "version": VERSION,
        "arch": arch,
        "num_classes": len(classes),
        "classes": list(classes),
        "preprocess": preprocess.to_dict(),
        "state_dict": state,
        "versions": library_versions(),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        **extra,
    }


def save_checkpoint(ckpt: dict[str, Any], path: str | Path) -> None:
    """Write atomically, through a Python file object: a full disk is an OSError naming `path`."""
    with atomic_path(path) as tmp, writer_file(tmp) as fh:
        torch.save(ckpt, fh)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read and validate an rtk checkpoint."""
    path = Path(path)
    ckpt = torch_load(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise RtkError(f"{path} is not an rtk checkpoint (a plain state dict needs --arch and --num-classes)")
    for key in ("arch", "classes", "preprocess", "state_dict"):
        if key not in ckpt:
            raise RtkError(f"{path} is an incomplete rtk checkpoint: no {key!r}")
    if len(ckpt["classes"]) != ckpt["num_classes"]:
        raise RtkError(f"{path}: {len(ckpt['classes'])} class names for {ckpt['num_classes']} classes")
    check_arch(ckpt["arch"])
    return ckpt


def model_from_checkpoint(ckpt: dict[str, Any]) -> nn.Module:
    """The eval-mode model a checkpoint describes."""
    model = build(ckpt["arch"], ckpt["num_classes"])
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as exc:
        raise RtkError(f"the checkpoint's weights do not fit {ckpt['arch']}: {str(exc).splitlines()[0]}") from None
    return model.eval()


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP / torch.compile wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


@dataclass(frozen=True)
class ModelSource:
    """A model to export or to use as reference: an rtk checkpoint, a plain state dict, or torchvision weights."""

    arch: str
    classes: tuple[str, ...]
    preprocess: PreprocessSpec
    kind: str  # "checkpoint" | "state_dict" | "torchvision"
    path: str | None = None
    sha256: str | None = None
    weights: str | None = None  # torchvision weights name, e.g. ResNet50_Weights.IMAGENET1K_V2

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "arch": self.arch, "path": self.path, "sha256": self.sha256,
                "weights": self.weights, "num_classes": len(self.classes)}

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> ModelSource:
        """The source a bundle's manifest records (`to_dict` plus the bundle's classes and preprocessing)."""
        src = manifest.source
        return cls(src["arch"], manifest.classes, manifest.preprocess, src["kind"], src.get("path"), src.get("sha256"),
                   src.get("weights"))


def load_source(checkpoint: str | Path | None = None, arch: str | None = None, weights: str | None = None,
                num_classes: int | None = None, image_size: int | None = None) -> tuple[nn.Module, ModelSource]:
    """The eval-mode model and its description, from a checkpoint file or from torchvision weights."""
    if checkpoint is not None:
        path = Path(checkpoint)
        obj = torch_load(path)
        digest = sha256_file(path)
        if isinstance(obj, dict) and obj.get("format") == FORMAT:
            ckpt = load_checkpoint(path)
            if arch is not None and arch != ckpt["arch"]:
                raise RtkError(f"{path} holds a {ckpt['arch']} checkpoint, but --arch is {arch}")
            source = ModelSource(ckpt["arch"], tuple(ckpt["classes"]), PreprocessSpec.from_dict(ckpt["preprocess"]),
                                 "checkpoint", str(path.resolve()), digest)
            return model_from_checkpoint(ckpt), source
        if arch is None or num_classes is None:
            raise RtkError(f"{path} is a plain state dict: give --arch and --num-classes")
        model = build(arch, num_classes)
        state, _ = read_state_dict(path)
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise RtkError(f"{path} does not fit {arch} with {num_classes} classes: {str(exc).splitlines()[0]}") from None
        crop = image_size or 224
        spec = PreprocessSpec(resize_size=int(crop / 0.875), crop_size=crop)
        classes = tuple(str(i) for i in range(num_classes))
        return model.eval(), ModelSource(arch, classes, spec, "state_dict", str(path.resolve()), digest)
    if arch is None or weights is None or weights.lower() == "none":
        raise RtkError("give a CHECKPOINT, or --arch with pretrained --weights (DEFAULT, IMAGENET1K_V1, ...)")
    from toolkit.training.models import pretrained_state_dict, pretrained_weights, weights_preprocess

    w = pretrained_weights(arch, weights)
    classes = tuple(w.meta["categories"])
    model = build(arch, len(classes))
    model.load_state_dict(pretrained_state_dict(w))
    return model.eval(), ModelSource(arch, classes, weights_preprocess(w), "torchvision", weights=str(w))


def source_from_manifest(manifest: Manifest, checkpoint: str | Path | None = None) -> tuple[nn.Module, ModelSource]:
    """Rebuild a bundle's reference model: `checkpoint` if given, else what the manifest names (hash checked)."""
    src = manifest.source
    if checkpoint is not None:
        return load_source(checkpoint, arch=src["arch"], num_classes=src["num_classes"])
    if src["kind"] == "torchvision":
        name = src["weights"].split(".")[-1]
        return load_source(None, arch=src["arch"], weights=name)
    path = Path(src["path"])
    if not path.is_file():
        raise RtkError(f"the bundle's source checkpoint {path} is gone; pass --checkpoint")
    digest = sha256_file(path)
    if digest != src["sha256"]:
        raise RtkError(f"{path} changed since export (sha256 {digest[:12]}..., bundle has {src['sha256'][:12]}...); "
                       "pass --checkpoint with the exported one")
    return load_source(path, arch=src["arch"], num_classes=src["num_classes"])
