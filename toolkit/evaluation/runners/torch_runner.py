"""torch runners: the eager model (from the checkpoint), TorchScript and torch.export files, on CPU or CUDA."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from toolkit.evaluation.runners.base import Runner


def _torch():
    import torch

    return torch


def keeps_torch_threads(fn):
    """Restore torch's thread count after `fn`: a stage that sets threads must not change what the
    caller runs next (training reproducibility depends on the thread count)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        torch = _torch()
        before = torch.get_num_threads()
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(before)

    return wrapper


def cuda_problem() -> str | None:
    if not _torch().cuda.is_available():
        return "torch.cuda.is_available() is False"
    return None


def set_tf32(enabled: bool) -> None:
    torch = _torch()
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled


@dataclass
class TorchModuleRunner(Runner):
    """A torch module taking uint8 NHWC; `module_factory()` builds a fresh instance for this runner alone."""

    device: str = "cpu"
    autocast: str | None = None  # "bf16" | "fp16"
    module_factory: Callable[[], Any] | None = None

    def load(self) -> None:
        torch = _torch()
        if self.options.threads:
            torch.set_num_threads(self.options.threads)
        if self.device == "cuda":
            set_tf32(self.options.tf32)
            self.details["tf32"] = self.options.tf32
            self.details["gpu"] = torch.cuda.get_device_name(0)
        module = self.module_factory()
        if self.autocast:
            module = module.to(memory_format=torch.channels_last)
        self.module = module.to(self.device)
        self.details["threads"] = torch.get_num_threads()

    def release(self) -> None:
        self.module = None
        if self.device == "cuda":
            _torch().cuda.empty_cache()

    def run_prepared(self, prepared: np.ndarray) -> np.ndarray:
        torch = _torch()
        with torch.inference_mode():
            x = torch.from_numpy(prepared).to(self.device, non_blocking=False)
            dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.autocast or "")
            with torch.autocast(self.device, dtype=dtype or torch.float32, enabled=dtype is not None):
                out = self.module(x)
            out = out[0] if isinstance(out, (tuple, list)) else out
            # .cpu() waits for the device: the result is on the host when this returns.
            return out.float().cpu().numpy()


def eager_module(model, spec):
    """The reference model wrapped with the in-graph preprocessing, as a copy of its own: a runner
    that moves or casts it never changes the reference or another runner's model."""
    import copy

    from toolkit.export.graph import ImageClassifier

    return ImageClassifier(copy.deepcopy(model), spec).eval()
