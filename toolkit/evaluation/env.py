"""What this machine has: library versions, CPU features, CUDA, onnxruntime providers.

`rtk doctor` prints it; benchmark and verify records embed it. Imports are lazy and guarded so a
broken library is reported, not raised.
"""

from __future__ import annotations

import importlib
import os
import platform
import sys
from typing import Any

from toolkit.core.hardware import cpu_info
from toolkit.core.versions import library_versions, ort_packages

REQUIRED = ("torch", "torchvision", "onnx", "onnxruntime", "numpy", "pillow", "click")
_IMPORT_NAME = {"pillow": "PIL"}


def cuda_info() -> dict[str, Any]:
    """Whether torch can use CUDA, and the GPU and driver when it can."""
    try:
        import torch
    except Exception as exc:
        return {"available": False, "reason": f"torch cannot be imported: {exc}"}
    if not torch.cuda.is_available():
        return {"available": False, "reason": "torch.cuda.is_available() is False", "torch_cuda": torch.version.cuda}
    props = torch.cuda.get_device_properties(0)
    info: dict[str, Any] = {
        "available": True,
        "device_count": torch.cuda.device_count(),
        "name": props.name,
        "capability": f"{props.major}.{props.minor}",
        "memory_gib": round(props.total_memory / 2**30, 1),
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "tf32_cudnn": torch.backends.cudnn.allow_tf32,
    }
    try:
        import subprocess

        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=10, check=False,
        )
        info["driver"] = out.stdout.strip().splitlines()[0] if out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        info["driver"] = None
    return info


def ort_info() -> dict[str, Any]:
    try:
        import onnxruntime as ort
    except Exception as exc:
        return {"importable": False, "reason": str(exc), "providers": []}
    return {"importable": True, "version": ort.__version__, "providers": ort.get_available_providers(),
            "device": ort.get_device()}


def cuda_provider_problem() -> str | None:
    """Why onnxruntime's CUDA provider cannot load here, naming the missing library; None if it can."""
    try:
        import onnxruntime as ort
    except Exception as exc:
        return f"onnxruntime cannot be imported: {exc}"
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return "CUDAExecutionProvider not in onnxruntime's providers (install the gpu extra: onnxruntime-gpu)"
    from toolkit.serving.sessions import preload_cuda_libraries

    preload_cuda_libraries()
    capi = os.path.join(os.path.dirname(ort.__file__), "capi")
    lib = os.path.join(capi, "libonnxruntime_providers_cuda.so")
    if os.path.exists(lib):
        import ctypes

        try:
            ctypes.CDLL(lib)
        except OSError as exc:  # the message names the missing .so (libcudnn.so.9, libcublasLt.so.13, ...)
            return f"the CUDA provider library does not load: {exc}"
    return None


def doctor_report() -> dict[str, Any]:
    """Everything `rtk doctor` shows, plus `problems` (broken) and `warnings` (works, but take care)."""
    versions = library_versions()
    problems, warnings = [], []
    for name in REQUIRED:
        mod = _IMPORT_NAME.get(name, name)
        try:
            importlib.import_module(mod)
        except Exception as exc:
            problems.append(f"{name} cannot be imported: {type(exc).__name__}: {exc}")
    try:
        importlib.import_module("onnxscript")
    except Exception:
        warnings.append("onnxscript is missing: the default ONNX exporter (dynamo=True) needs it; pip install onnxscript")
    pkgs = ort_packages()
    if len(pkgs) > 1:
        warnings.append(f"several onnxruntime packages are installed ({', '.join(pkgs)}); they overwrite each other: "
                        "keep one (pip uninstall the others, then reinstall the one you want)")
    cuda = cuda_info()
    ort_ = ort_info()
    if cuda.get("available") and ort_.get("importable"):
        problem = cuda_provider_problem()
        if problem:
            warnings.append(f"onnxruntime CUDA: {problem}")
    return {
        "toolkit": _toolkit_version(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "versions": versions,
        "onnxruntime_packages": pkgs,
        "onnxruntime": ort_,
        "cuda": cuda,
        "cpu": cpu_info().to_dict(),
        "problems": problems,
        "warnings": warnings,
    }


def environment() -> dict[str, Any]:
    """The short environment record stored beside benchmark and verify results."""
    return {
        "toolkit": _toolkit_version(),
        "platform": platform.platform(),
        "versions": library_versions(),
        "cpu": cpu_info().to_dict(),
        "cuda": cuda_info(),
        "onnxruntime_providers": ort_info().get("providers", []),
    }


def _toolkit_version() -> str:
    from toolkit import __version__

    return __version__
