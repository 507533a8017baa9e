"""One `Runner` interface for every runtime: uint8 NHWC images in, float32 logits on the host out.

Parity (`verify`) and timing (`benchmark`) are written once against it. A runtime that cannot run
here is reported as `Skipped` with its reason; it is never silently replaced (onnxruntime quietly
falls back to CPU, so every session's providers are checked after creation).
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.bundle import Bundle
from toolkit.errors import RtkError

# runtime -> (device, which artifacts it runs)
RUNTIMES: dict[str, tuple[str, str]] = {
    "eager": ("cpu", "checkpoint fp32"),
    "eager-bf16": ("cpu", "checkpoint, bf16 autocast, channels_last"),
    "eager-cuda": ("cuda", "checkpoint fp32"),
    "eager-fp16": ("cuda", "checkpoint, fp16 autocast, channels_last"),
    "torchscript": ("cpu", "model.ts"),
    "torchscript-cuda": ("cuda", "model.ts"),
    "torch-export": ("cpu", "model.pt2"),
    "torch-export-cuda": ("cuda", "model.pt2"),
    "ort-cpu": ("cpu", "every ONNX file"),
    "ort-cuda": ("cuda", "model.onnx, model.fp16.onnx"),
    "ort-cuda-iobinding": ("cuda", "model.onnx, model.fp16.onnx; input placed on the device once"),
    "ort-tensorrt": ("cuda", "model.onnx with TensorRT fp16; engine cache in the bundle"),
    "openvino": ("cpu", "fp32 and int8 ONNX files through OpenVINO (extra: openvino)"),
    "openvino-bf16": ("cpu", "fp32 ONNX files through OpenVINO with bf16 inference precision"),
}


def runtimes_on(device: str | None, among: tuple[str, ...] | list[str] | None = None) -> list[str] | None:
    """The runtimes (of `among`, default all) that run on `device` ("cpu" or "cuda"); None keeps them all."""
    if device is None:
        return list(among) if among else None
    if device not in ("cpu", "cuda"):
        raise RtkError(f"--device must be cpu or cuda, got {device!r}")
    return [r for r in (among or RUNTIMES) if RUNTIMES[r][0] == device]


class RuntimeUnavailable(Exception):
    """This runtime cannot run here; the message says why."""


@dataclass(frozen=True)
class RunOptions:
    threads: int | None = None
    tf32: bool = False  # off: fp32 parity needs full-precision matmuls on both sides
    cuda_graph: bool = False
    profile_placement: bool = True
    ort_graph_optimization: str = "all"  # onnxruntime: disable | basic | extended | all
    ort_optimized_path: str | None = None  # onnxruntime writes its optimised graph here (hardware-specific)


@dataclass(frozen=True)
class Skipped:
    runtime: str
    artifact: str
    precision: str
    reason: str


@dataclass
class Runner:
    """Base: subclasses set up in `load()` and compute in `run_prepared()`."""

    runtime: str
    artifact: str
    precision: str
    options: RunOptions = field(default_factory=RunOptions)
    details: dict[str, Any] = field(default_factory=dict)

    def load(self) -> None:
        raise NotImplementedError

    def prepare(self, images: np.ndarray) -> Any:
        """Place input where the runtime wants it. Only IO-binding runners do work here."""
        return images

    def run_prepared(self, prepared: Any) -> np.ndarray:
        raise NotImplementedError

    def __call__(self, images: np.ndarray) -> np.ndarray:
        check_batch(images)
        return self.run_prepared(self.prepare(images))

    @property
    def label(self) -> str:
        return f"{self.runtime}:{self.artifact}"


def check_batch(images: np.ndarray) -> None:
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
        shape = getattr(images, "shape", None)
        raise RtkError(f"runners take uint8 arrays [N, H, W, 3], got {getattr(images, 'dtype', type(images))} {shape}")


# ---------------------------------------------------------------- torch runtimes


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


def torch_threads(threads: int | None) -> None:
    if threads:
        torch = _torch()
        torch.set_num_threads(threads)


def cuda_problem() -> str | None:
    torch = _torch()
    if not torch.cuda.is_available():
        return "torch.cuda.is_available() is False"
    return None


def set_tf32(enabled: bool) -> None:
    torch = _torch()
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled


@dataclass
class TorchModuleRunner(Runner):
    """Eager (from the checkpoint), TorchScript or torch.export models through torch."""

    device: str = "cpu"
    autocast: str | None = None  # "bf16" | "fp16"
    module_factory: Any = None  # () -> nn.Module taking uint8 NHWC

    def load(self) -> None:
        torch = _torch()
        torch_threads(self.options.threads)
        if self.device == "cuda":
            set_tf32(self.options.tf32)
            self.details["tf32"] = self.options.tf32
            self.details["gpu"] = torch.cuda.get_device_name(0)
        module = self.module_factory()
        if self.autocast:
            module = module.to(memory_format=torch.channels_last)
        self.module = module.to(self.device)
        self.details["threads"] = torch.get_num_threads()

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
    from toolkit.graph import ImageClassifier

    return ImageClassifier(model, spec).eval()


def load_torchscript(path: Path, device: str = "cpu"):
    return _torch().jit.load(str(path), map_location=device).eval()


def load_pt2(path: Path):
    return _torch().export.load(str(path)).module()


# ---------------------------------------------------------------- onnxruntime


def preload_cuda_libraries() -> None:
    """Let onnxruntime-gpu use the CUDA/cuDNN libraries from torch's wheels (onnxruntime >= 1.21)."""
    import onnxruntime as ort

    if hasattr(ort, "preload_dlls"):
        try:
            ort.preload_dlls()
        except Exception:  # a missing library is reported when the session is created
            pass


def provider_problem(provider: str) -> str | None:
    try:
        import onnxruntime as ort
    except ImportError as exc:
        return f"onnxruntime cannot be imported: {exc}"
    available = ort.get_available_providers()
    if provider not in available:
        return f"{provider} not in onnxruntime's providers {available}"
    if provider == "TensorrtExecutionProvider":
        import ctypes.util

        # onnxruntime-gpu lists TensorRT even without its libraries, then falls back to CUDA at session creation.
        if ctypes.util.find_library("nvinfer") is None and not _loadable("libnvinfer.so.10"):
            return "TensorRT's libraries (libnvinfer) are not installed: onnxruntime lists the provider but cannot use it"
    return None


def _loadable(library: str) -> bool:
    import ctypes

    try:
        ctypes.CDLL(library)
        return True
    except OSError:
        return False


ORT_GRAPH_LEVELS = ("disable", "basic", "extended", "all")


def session_options(threads: int | None, profile: bool = False, graph_optimization: str = "all",
                    optimized_path: str | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    if graph_optimization not in ORT_GRAPH_LEVELS:
        raise RtkError(f"unknown onnxruntime graph optimization level {graph_optimization!r}; choose from {ORT_GRAPH_LEVELS}")
    so.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[graph_optimization]
    if optimized_path:
        so.optimized_model_filepath = optimized_path
    if profile:
        so.enable_profiling = True
        so.profile_file_prefix = os.path.join(tempfile.mkdtemp(prefix="rtk-ort-profile-"), "ort")
    return so


def node_placement(path: Path, providers: list, threads: int | None, example: np.ndarray) -> dict[str, int]:
    """Which provider ran how many nodes, from one profiled run of a separate session."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), session_options(threads, profile=True), providers=providers)
    session.run(None, {session.get_inputs()[0].name: example})
    profile = session.end_profiling()
    try:
        events = json.loads(Path(profile).read_text())
    finally:
        Path(profile).unlink(missing_ok=True)
    counts: Counter[str] = Counter()
    seen = set()
    for ev in events:
        args = ev.get("args", {})
        if ev.get("cat") == "Node" and "provider" in args and ev.get("name", "").endswith("_kernel_time"):
            node = ev["name"].removesuffix("_kernel_time")
            if node not in seen:
                seen.add(node)
                counts[args["provider"]] += 1
    return dict(counts)


@dataclass
class OrtRunner(Runner):
    path: Path = Path()
    provider: str = "CPUExecutionProvider"
    io_binding: bool = False
    trt_cache: Path | None = None

    def providers(self) -> list:
        opts = self.options
        if self.provider == "CPUExecutionProvider":
            return ["CPUExecutionProvider"]
        cuda = ("CUDAExecutionProvider", {"device_id": 0, "use_tf32": int(opts.tf32),
                                          "enable_cuda_graph": int(opts.cuda_graph and self.io_binding)})
        if self.provider == "CUDAExecutionProvider":
            return [cuda, "CPUExecutionProvider"]
        trt = ("TensorrtExecutionProvider", {
            "device_id": 0, "trt_fp16_enable": True,
            "trt_engine_cache_enable": True, "trt_engine_cache_path": str(self.trt_cache),  # keyed by the file's sha256
            "trt_timing_cache_enable": True, "trt_timing_cache_path": str(self.trt_cache),
        })
        return [trt, cuda, "CPUExecutionProvider"]

    def load(self) -> None:
        import onnxruntime as ort

        problem = provider_problem(self.provider)
        if problem:
            raise RuntimeUnavailable(problem)
        if self.provider != "CPUExecutionProvider":
            preload_cuda_libraries()
        if self.trt_cache is not None:
            self.trt_cache.mkdir(parents=True, exist_ok=True)
        try:
            so = session_options(self.options.threads, graph_optimization=self.options.ort_graph_optimization,
                                 optimized_path=self.options.ort_optimized_path)
            self.session = ort.InferenceSession(str(self.path), so, providers=self.providers())
        except Exception as exc:
            raise RuntimeUnavailable(f"onnxruntime could not create a {self.provider} session: {str(exc).splitlines()[0]}") from None
        got = self.session.get_providers()
        if got[0] != self.provider:
            raise RuntimeUnavailable(f"asked for {self.provider}, onnxruntime gave {got} (a library is missing: run rtk doctor)")
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name
        self.details.update(providers=got, threads=self.options.threads, io_binding=self.io_binding,
                            graph_optimization=self.options.ort_graph_optimization)
        if self.provider != "CPUExecutionProvider":
            self.details["tf32"] = self.options.tf32
            self.details["cuda_graph"] = self.options.cuda_graph and self.io_binding
            if self.options.profile_placement:
                shape = [d if isinstance(d, int) else 1 for d in self.session.get_inputs()[0].shape]
                placement = node_placement(self.path, self.providers(), self.options.threads, np.zeros(shape, np.uint8))
                self.details["node_placement"] = placement
                on_cpu = placement.get("CPUExecutionProvider", 0)
                if on_cpu:
                    self.details["warning"] = f"{on_cpu} of {sum(placement.values())} nodes ran on CPUExecutionProvider"
        self._bound: dict[tuple, Any] = {}

    def prepare(self, images: np.ndarray) -> Any:
        if not self.io_binding:
            return images
        import onnxruntime as ort

        key = images.shape
        if key not in self._bound:
            binding = self.session.io_binding()
            device_input = ort.OrtValue.ortvalue_from_numpy(images, "cuda", 0)
            binding.bind_ortvalue_input(self.input_name, device_input)
            binding.bind_output(self.output_name, "cuda", 0)
            self._bound[key] = (binding, device_input)
        else:  # same device buffer, new contents: what CUDA graphs require
            self._bound[key][1].update_inplace(images)
        return self._bound[key][0]

    def run_prepared(self, prepared: Any) -> np.ndarray:
        if not self.io_binding:
            return self.session.run([self.output_name], {self.input_name: prepared})[0]
        prepared.synchronize_inputs()
        self.session.run_with_iobinding(prepared)
        # copy_outputs_to_cpu waits for the device, so the logits are on the host.
        return prepared.copy_outputs_to_cpu()[0]


# ---------------------------------------------------------------- OpenVINO


def openvino_problem(precision_hint: str = "f32") -> str | None:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return "openvino is not installed (pip install -e '.[openvino]')"
    if precision_hint == "bf16":
        from toolkit.env import cpu_info

        if not cpu_info().fast_bf16:
            return "this CPU has neither AMX nor AVX512-BF16 (OpenVINO would not run bf16)"
    return None


@dataclass
class OpenVinoRunner(Runner):
    """An ONNX file compiled by OpenVINO for the CPU, with an inference-precision hint (f32 or bf16).
    Runs through the production runtime's OpenVINO backend, so verify/benchmark measure what serves."""

    path: Path = Path()
    precision_hint: str = "f32"

    def load(self) -> None:
        problem = openvino_problem(self.precision_hint)
        if problem:
            raise RuntimeUnavailable(problem)
        import openvino as ov

        from toolkit.runtime import OpenVinoBackend

        self.backend = OpenVinoBackend(self.path, self.options.threads, self.precision_hint)
        self.details.update(openvino=ov.get_version(), precision_hint=self.precision_hint, threads=self.options.threads,
                            compiled_precision=str(self.backend.compiled.get_property("INFERENCE_PRECISION_HINT")))

    def run_prepared(self, prepared: np.ndarray) -> np.ndarray:
        return self.backend.run(prepared)


# ---------------------------------------------------------------- planning


def artifact_runtimes(name: str, fmt: str, precision: str) -> list[str]:
    """Which runtimes run a bundle file."""
    if fmt == "torchscript":
        return ["torchscript", "torchscript-cuda"]
    if fmt == "pt2":
        return ["torch-export", "torch-export-cuda"]
    if name.endswith(".ort-opt.onnx"):  # onnxruntime's own CPU-optimised graph: onnxruntime CPU only
        return ["ort-cpu"]
    runtimes = ["ort-cpu"]
    if precision in ("fp32", "fp16"):
        runtimes += ["ort-cuda", "ort-cuda-iobinding"]
    if precision == "fp32":
        runtimes += ["ort-tensorrt", "openvino", "openvino-bf16"]
    if precision == "int8":
        runtimes.append("openvino")
    return runtimes


def plan(bundle: Bundle, runtimes: list[str] | None, reference_factory, options: RunOptions) -> list[Runner | Skipped]:
    """Runners for each (runtime, artifact) pair requested; what cannot run here comes back as Skipped.

    `reference_factory()` gives (model, spec) for each eager runner, when it loads (so a benchmark's
    cold start includes reading the checkpoint).
    """
    wanted = list(runtimes or RUNTIMES)
    for r in wanted:
        if r not in RUNTIMES:
            raise RtkError(f"unknown runtime {r!r}; choose from {', '.join(RUNTIMES)}")
    cuda_reason = cuda_problem() if any(RUNTIMES[r][0] == "cuda" for r in wanted) else None
    entries: list[Runner | Skipped] = []

    def eager(runtime: str, precision: str, device: str, autocast: str | None) -> Runner:
        return TorchModuleRunner(runtime, "checkpoint", precision, options, device=device, autocast=autocast,
                                 module_factory=lambda: eager_module(*reference_factory()))

    for runtime in wanted:
        device = RUNTIMES[runtime][0]
        if runtime.startswith("eager"):
            precision = {"eager-bf16": "bf16", "eager-fp16": "fp16"}.get(runtime, "fp32")
            reason = cuda_reason if device == "cuda" else None
            if runtime == "eager-bf16":
                from toolkit.env import cpu_info

                reason = None if cpu_info().fast_bf16 else "this CPU has neither AMX nor AVX512-BF16 (bf16 would be emulated)"
            entries.append(Skipped(runtime, "checkpoint", precision, reason) if reason
                           else eager(runtime, precision, device, precision if precision != "fp32" else None))
            continue
        for name, entry in bundle.files.items():
            if runtime not in artifact_runtimes(name, entry["format"], entry["precision"]):
                continue
            precision = {"ort-tensorrt": "fp16", "openvino-bf16": "bf16"}.get(runtime, entry["precision"])
            path = bundle.path(name)
            reason = cuda_reason if device == "cuda" else None
            if runtime.startswith("openvino"):
                hint = "bf16" if runtime == "openvino-bf16" else "f32"
                reason = openvino_problem(hint)
                runner: Runner = OpenVinoRunner(runtime, name, precision, options, path=path, precision_hint=hint)
            elif runtime.startswith("ort-"):
                provider = {"ort-cpu": "CPUExecutionProvider", "ort-tensorrt": "TensorrtExecutionProvider"}.get(
                    runtime, "CUDAExecutionProvider")
                reason = provider_problem(provider) or reason
                trt_cache = bundle.root / "trt-cache" / entry["sha256"][:16] if runtime == "ort-tensorrt" else None
                runner = OrtRunner(runtime, name, precision, options, path=path, provider=provider,
                                           io_binding=runtime == "ort-cuda-iobinding", trt_cache=trt_cache)
            elif entry["format"] == "torchscript":
                runner = TorchModuleRunner(runtime, name, precision, options, device=device,
                                           module_factory=lambda p=path, d=device: load_torchscript(p, d))
            else:
                runner = TorchModuleRunner(runtime, name, precision, options, device=device,
                                           module_factory=lambda p=path: load_pt2(p))
            entries.append(Skipped(runtime, name, precision, reason) if reason else runner)
    return entries


def load_or_skip(entries: list[Runner | Skipped]) -> list[Runner | Skipped]:
    """Load each runner; one whose runtime turns out unavailable becomes Skipped with the reason."""
    out: list[Runner | Skipped] = []
    for e in entries:
        if isinstance(e, Runner):
            try:
                e.load()
            except RuntimeUnavailable as exc:
                e = Skipped(e.runtime, e.artifact, e.precision, str(exc))
        out.append(e)
    return out


def require_named(entries: list[Runner | Skipped], named: list[str] | None) -> None:
    """A runtime the user named explicitly that cannot run here is an error, not a skip."""
    for runtime in named or []:
        mine = [e for e in entries if e.runtime == runtime]
        if not mine:
            raise RtkError(f"runtime {runtime} has nothing to run in this bundle ({RUNTIMES[runtime][1]})")
        if all(isinstance(e, Skipped) for e in mine):
            raise RtkError(f"runtime {runtime} is not available here: {mine[0].reason}")
