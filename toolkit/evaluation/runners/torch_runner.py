"""torch runners: the eager model (from the checkpoint), TorchScript and torch.export files, on CPU or CUDA."""

from __future__ import annotations

import functools
import importlib.util
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from toolkit.errors import RtkError
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


def compile_problem(device: str) -> str | None:
    """Why torch.compile cannot build kernels for `device` here: Inductor compiles CPU kernels with a C++
    compiler and writes CUDA kernels in Triton."""
    if device == "cuda":
        if problem := cuda_problem():
            return problem
        return None if importlib.util.find_spec("triton") else "triton is not installed (Inductor's CUDA kernels are Triton)"
    from torch._inductor import cpp_builder, exc

    try:
        cpp_builder.get_cpp_compiler()
    except exc.InvalidCxxCompiler:
        return "no C++ compiler (g++) found: Inductor compiles its CPU kernels with one"
    return None


def set_tf32(enabled: bool) -> None:
    torch = _torch()
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled


@dataclass
class TorchModuleRunner(Runner):
    """A torch module taking uint8 NHWC; `module_factory()` builds a fresh instance for this runner alone.
    With `compile`, the module runs under torch.compile (Inductor, default mode, dynamic=None), which
    compiles on the first call of each new input shape: that call's seconds go into `details`."""

    device: str = "cpu"
    autocast: str | None = None  # "bf16" | "fp16"
    module_factory: Callable[[], Any] | None = None
    compile: bool = False
    _shapes: set[tuple[int, ...]] = field(default_factory=set, init=False, repr=False, compare=False)

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
        if self.compile:  # lazy: dynamo traces and Inductor compiles on the first call, the cold start's end
            self.module = torch.compile(self.module)
            self._shapes = set()
            self.details["compile"] = "torch.compile, Inductor, default mode, dynamic=None"
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
                out = self._compiled(x) if self.compile and tuple(x.shape) not in self._shapes else self.module(x)
            out = out[0] if isinstance(out, (tuple, list)) else out
            # .cpu() waits for the device: the result is on the host when this returns.
            return out.float().cpu().numpy()

    def _compiled(self, x) -> Any:
        """The first call at a new input shape, which may (re)compile: timed into `details`. With the default
        dynamic=None, batch 1 compiles a static graph and the second size a dynamic one that later sizes reuse,
        within dynamo's recompile limit (8 per function); hitting it is an error here, not dynamo's silent
        fallback to the eager module, which would be timed and verified as if it were compiled."""
        torch = _torch()
        from torch._dynamo.exc import FailOnRecompileLimitHit

        started = time.perf_counter()
        try:
            with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
                out = self.module(x)
        except FailOnRecompileLimitHit as exc:
            raise RtkError(f"torch.compile reached dynamo's recompile limit "
                           f"({torch._dynamo.config.recompile_limit}) at input {tuple(x.shape)}: this process "
                           "has compiled too many variants of the model; run it in a fresh process") from exc
        if self.device == "cuda":
            torch.cuda.synchronize()
        seconds = round(time.perf_counter() - started, 3)
        self._shapes.add(tuple(x.shape))
        self.details.setdefault("compile_seconds", seconds)  # the first call: trace and compile, or load caches
        # per batch size, its first call over this runner's life: a reload reuses dynamo's compiled code
        self.details.setdefault("first_call_seconds", {}).setdefault(f"batch {x.shape[0]}", seconds)
        return out


def eager_module(model, spec):
    """The reference model wrapped with the in-graph preprocessing, as a copy of its own: a runner
    that moves or casts it never changes the reference or another runner's model."""
    import copy

    from toolkit.export.graph import ImageClassifier

    return ImageClassifier(copy.deepcopy(model), spec).eval()
